"""What every CLIP method that touches data needs: zero-shot heads and image loaders per task.

Fine-tuning, data-based merges (Fisher, RegMean) and test-time adaptation (AdaMerging,
Concrete, WEMoE) all turn a vision encoder into a classifier for one task with that task's
zero-shot head, and read the task's images from the model pool. :class:`CLIPTaskClassifiers`
does both once, for any algorithm:

* the full CLIP (text tower, ``visual_projection``, ``logit_scale``) comes from the method's
  ``clip_model`` option, else from the pool's ``_pretrained_`` entry (a full CLIP checkpoint, as
  the hub's ``openai/clip-vit-*`` are);
* heads are built once per task (class names and templates from the method's options, the mini
  benchmark or the eight CLIP tasks) and cached on disk by content hash, like the task pool's;
* loaders convert images to RGB and preprocess them with the pool's processor; shuffled loaders
  are seeded;
* the endless test-time streams (one batch per task per step, many epochs over small test sets)
  decode and preprocess each image once and keep its pixel tensor (:class:`CachedBatchStream`),
  when the whole preprocessed split fits in :data:`PREPROCESSED_CACHE_BYTES`; the batches are the
  same tensors, bit for bit, as those of a loader that preprocesses every draw.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from fusion_bench.data.loading import ImageClassificationCollate
from fusion_bench.data.task_text import task_classnames_and_templates
from fusion_bench.errors import ConfigError, DatasetError
from fusion_bench.modelpool import PRETRAINED, BaseModelPool
from fusion_bench.models.hf_clip import load_clip_model
from fusion_bench.models.zero_shot import CLIPZeroShotClassifier, cached_zero_shot_classifier, text_tower_fingerprint
from fusion_bench.taskpool.clip_vision.taskpool import default_head_cache_dir

__all__ = [
    "CLIPTaskClassifiers",
    "CachedBatchStream",
    "SeededBatchStream",
    "cycle",
    "entropy_loss",
    "ENTROPY_EPS",
    "PREPROCESSED_CACHE_BYTES",
]

ENTROPY_EPS = 1e-8
PREPROCESSED_CACHE_BYTES = 1 << 30  # a test-time stream keeps its split's pixel tensors when they fit in 1 GiB


def cycle(loader: Any) -> Iterator[Any]:
    """Cycle over ``loader``'s epochs without end (each epoch reshuffled by its sampler)."""
    while True:
        yield from loader


def entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """The test-time objective: mean over the batch of ``−Σ_c p log(p + 1e-8)``, ``p = softmax(logits)``.

    Args:
        logits: ``(B, C)``.

    Returns:
        a scalar.
    """
    probs = logits.float().softmax(dim=-1)  # (B, C)
    return -(probs * (probs + ENTROPY_EPS).log()).sum(dim=-1).mean()


class CLIPTaskClassifiers:
    """Zero-shot heads and data loaders of a CLIP model pool's tasks.

    Args:
        modelpool: the pool (its processor, datasets and, by default, its ``_pretrained_`` CLIP).
        clip_model: the full CLIP giving the text tower, projection and logit scale (path,
            ``{pretrained_model_name_or_path}`` or ``_target_``); None: the ``_pretrained_`` entry.
        task_text: ``{task: {"classnames": [...], "templates": [...]}}`` overriding the built-in lists.
        head_cache_dir: where heads are cached (``"default"``: the task pool's cache; None: no cache).
        what: the method's name, for messages.
    """

    def __init__(
        self,
        modelpool: BaseModelPool,
        *,
        clip_model: Any = None,
        task_text: Mapping[str, Any] | None = None,
        head_cache_dir: str | None = "default",
        what: str = "method",
    ) -> None:
        self.modelpool = modelpool
        self.what = what
        self._clip_cfg = clip_model if clip_model is not None else modelpool.get_model_config(PRETRAINED)
        self._task_text = dict(task_text or {})
        self.head_cache_dir = default_head_cache_dir() if head_cache_dir == "default" else head_cache_dir
        self._clip: nn.Module | None = None
        self._processor: Any = None
        self._heads: dict[str, torch.Tensor] = {}

    # ---- models ---------------------------------------------------------------------------
    @property
    def clip_model(self) -> nn.Module:
        """The full CLIP, frozen, in eval mode (loaded on first use)."""
        if self._clip is None:
            self._clip = load_clip_model(self._clip_cfg, what=f"{self.what}: clip_model").eval().requires_grad_(False)
        return self._clip

    @property
    def processor(self) -> Any:
        """The pool's ``CLIPProcessor``."""
        if self._processor is None:
            self._processor = self.modelpool.load_processor()
        return self._processor

    def head(self, task: str) -> torch.Tensor:
        """The ``(C, D)`` zero-shot head of ``task`` (built once, cached on disk)."""
        if task not in self._heads:
            text = self._task_text.get(task) or {}
            classnames, templates = task_classnames_and_templates(
                task, text.get("classnames"), text.get("templates"), what=self.what
            )
            tokenizer = getattr(self.processor, "tokenizer", self.processor)
            fingerprint = text_tower_fingerprint(self.clip_model) if self.head_cache_dir else None
            self._heads[task] = cached_zero_shot_classifier(
                self.clip_model,
                tokenizer,
                classnames,
                templates,
                cache_dir=self.head_cache_dir,
                fingerprint=fingerprint,
            )
        return self._heads[task]

    def fingerprint(self, tasks: Sequence[str]) -> str:
        """A hash of what turns image features into the tasks' logits: each task's head, the CLIP's visual
        projection and logit scale (a run resumed from a checkpoint must have trained against the same)."""
        h = hashlib.blake2b(digest_size=16)
        clip = self.clip_model
        named = [(f"head:{t}", self.head(t)) for t in tasks]
        named += [("visual_projection", clip.visual_projection.weight), ("logit_scale", clip.logit_scale)]
        for name, tensor in named:
            h.update(name.encode())
            h.update(tensor.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def classifier(self, vision_model: nn.Module, task: str) -> CLIPZeroShotClassifier:
        """``vision_model`` behind ``task``'s head, the CLIP's (frozen) projection and logit scale."""
        clip = self.clip_model
        return CLIPZeroShotClassifier(vision_model, clip.visual_projection, clip.logit_scale, self.head(task))

    # ---- data -----------------------------------------------------------------------------
    def dataset(self, split: str, task: str) -> Any:
        """The pool's ``split`` (``"train"``, ``"val"`` or ``"test"``) dataset of ``task``."""
        loaders = {
            "train": self.modelpool.load_train_dataset,
            "val": self.modelpool.load_val_dataset,
            "test": self.modelpool.load_test_dataset,
        }
        if split not in loaders:
            raise ConfigError(f"{self.what}: unknown split {split!r}; choose one of {', '.join(loaders)}")
        return loaders[split](task)

    def loader(
        self,
        dataset: Any,
        *,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        limit: int | None = None,
        what: str = "dataset",
    ) -> DataLoader:
        """A loader of ``(pixel_values, labels)`` batches over ``dataset``.

        Args:
            dataset: rows with ``image`` and ``label``.
            batch_size: images per batch.
            shuffle: reshuffle every epoch, from a generator seeded by ``seed``.
            seed: the shuffling seed.
            num_workers: DataLoader workers.
            drop_last: drop a short last batch.
            limit: use only the first ``limit`` rows (None: all).
            what: names the dataset in messages.

        Raises:
            DatasetError: the dataset has fewer rows than one batch needs.
        """
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset)))) if hasattr(dataset, "select") else dataset
        if len(dataset) == 0 or (drop_last and len(dataset) < batch_size):
            raise DatasetError(f"{self.what}: {what} has {len(dataset)} samples, too few for batch_size {batch_size}")
        generator = torch.Generator().manual_seed(seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=num_workers,
            drop_last=drop_last,
            collate_fn=self.collate(),
        )

    def collate(self) -> ImageClassificationCollate:
        """Rows ``{image, label}`` -> ``(pixel_values, labels)`` with the pool's image processor."""
        return ImageClassificationCollate(getattr(self.processor, "image_processor", self.processor))

    def check_tasks(self, split: str, tasks: Sequence[str]) -> None:
        """Raise a :class:`ConfigError` naming every task of ``tasks`` without a ``split`` dataset."""
        names = {
            "train": self.modelpool.train_dataset_names,
            "val": self.modelpool.val_dataset_names,
            "test": self.modelpool.test_dataset_names,
        }[split]
        missing = [t for t in tasks if t not in names]
        if missing:
            raise ConfigError(
                f"{self.what}: model(s) {missing} have no {split} dataset in the pool "
                f"({split} datasets: {', '.join(names) or 'none'}); add them under the pool's {split}_datasets"
            )

    def test_time_batches(
        self,
        tasks: Sequence[str],
        *,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        split: str = "test",
        start: int = 0,
    ) -> dict[str, Iterator[tuple[torch.Tensor, torch.Tensor]]]:
        """One endless, seeded, shuffled stream of ``(pixel_values, labels)`` per task.

        Test-time methods draw one batch per task per step; each task's stream has its own
        generator (``seed`` + the task's position), so the batches of one task do not depend on
        how many other tasks there are. Labels are there for logging only: the methods never use them.
        Without workers, each image is decoded and preprocessed once (:class:`CachedBatchStream`).

        Args:
            tasks: the tasks, in pool order.
            batch_size: images per batch.
            seed: the base seed of the shuffles.
            num_workers: DataLoader workers.
            split: the pool's dataset split.
            start: batches of each stream already used (a resumed run): the stream starts at
                batch ``start``, skipped over indices only (no image is read for them).

        Raises:
            ConfigError: a task has no dataset of that split in the pool.
        """
        self.check_tasks(split, tasks)
        streams = {}
        for i, task in enumerate(tasks):
            dataset = self.dataset(split, task)
            if len(dataset) == 0:
                raise DatasetError(f"{self.what}: {split} dataset {task!r} is empty")
            sampler = SeededBatchStream(len(dataset), batch_size, seed=seed + i, start=start)
            if num_workers == 0:
                streams[task] = CachedBatchStream(dataset, sampler, self.collate())
            else:
                streams[task] = iter(
                    DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=self.collate())
                )
        return streams


class CachedBatchStream:
    """``(pixel_values, labels)`` batches of ``dataset`` at the index batches of ``sampler``, each row read,
    decoded and preprocessed by ``collate`` once, its tensors kept for the later epochs.

    ``collate`` must treat rows independently (an image processor does); a batch is then the same
    tensors, bit for bit, as ``collate`` of its rows. The rows are kept only while the whole dataset's
    tensors, estimated from the first batch, fit in ``max_bytes``; otherwise every batch is collated
    afresh, as a DataLoader would.

    Args:
        dataset: a map-style dataset of rows (``__getitems__`` is used when it has one).
        sampler: an iterable of index batches (endless for a test-time stream).
        collate: rows -> ``(pixel_values, labels)``.
        max_bytes: the most the kept tensors of the whole dataset may take.
    """

    def __init__(self, dataset: Any, sampler: Any, collate: Any, *, max_bytes: int = PREPROCESSED_CACHE_BYTES) -> None:
        self.dataset, self.collate, self.max_bytes = dataset, collate, max_bytes
        self._batches = iter(sampler)
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {}

    def __iter__(self) -> "CachedBatchStream":
        return self

    def _read(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        getitems = getattr(self.dataset, "__getitems__", None)
        rows = getitems(indices) if getitems is not None else [self.dataset[i] for i in indices]
        return self.collate(rows)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices = list(next(self._batches))
        if self._rows is None:
            return self._read(indices)
        missing = [i for i in dict.fromkeys(indices) if i not in self._rows]
        if missing:
            pixels, labels = self._read(missing)
            if not self._rows and pixels[0].nbytes * len(self.dataset) > self.max_bytes:
                self._rows = None  # too large to keep: collate every batch
                return (pixels, labels) if missing == indices else self._read(indices)
            self._rows.update((i, (p, y)) for i, p, y in zip(missing, pixels, labels))
        kept = [self._rows[i] for i in indices]
        return torch.stack([p for p, _ in kept]), torch.stack([y for _, y in kept])


class SeededBatchStream(Sampler[list[int]]):
    """Endless batches of indices into ``range(num_samples)``, reshuffled every epoch.

    Epoch ``e`` is the ``e``-th ``randperm`` of one generator seeded by ``seed``, cut into
    ``ceil(num_samples / batch_size)`` batches (the last one may be short). Starting at batch
    ``start`` replays only the permutations, so a resumed run sees exactly the batches an
    uninterrupted one would, without reading the skipped images.

    Args:
        num_samples: the dataset's size (> 0).
        batch_size: indices per batch.
        seed: the generator's seed.
        start: the first batch to yield.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, start: int = 0) -> None:
        self.num_samples, self.batch_size, self.seed, self.start = num_samples, batch_size, seed, start

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed)
        per_epoch = -(-self.num_samples // self.batch_size)
        epoch, first = divmod(self.start, per_epoch)
        for _ in range(epoch):
            torch.randperm(self.num_samples, generator=generator)
        while True:
            order = torch.randperm(self.num_samples, generator=generator).tolist()
            for b in range(first, per_epoch):
                yield order[b * self.batch_size : (b + 1) * self.batch_size]
            first = 0
