"""What the merges that read each fine-tuned model's own task data share (Fisher, RegMean).

:class:`PerModelDataMerge` is their template: validate the options and the pool (every model has
its train dataset, same keys and shapes as ``_pretrained_``, regexes that match), then, **one model
at a time** and in pool order, load the model, compute its statistic (Fisher, Gram matrices) on the
first ``num_examples`` images of its task's train split, fold model and statistic into an
accumulator that holds only what the merge needs, and drop both. Peak memory is one model, its
statistic and the accumulator, whatever the number of models. The accumulator is checkpointed after
every model (``checkpoint_path``), so an interrupted run resumes after the last finished model.
At the end the merged tensors are written into the ``_pretrained_`` model; tensors excluded by
``exclude_param_names_regex`` keep their pre-trained values (as in the reference).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from fusion_bench.errors import ConfigError, IncompatibleModelsError
from fusion_bench.merge import check_finite, check_pool_compatible
from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers
from fusion_bench.method._options import check_bool, check_int
from fusion_bench.method.base_algorithm import BaseAlgorithm
from fusion_bench.modelpool import PRETRAINED, BaseModelPool
from fusion_bench.utils.checkpoint import load_checkpoint, save_checkpoint
from fusion_bench.utils.instantiate import to_container

__all__ = [
    "DATALOADER_KEYS",
    "check_dataloader_kwargs",
    "compile_exclusions",
    "fabric_or_cpu",
    "canonical_parameter_names",
    "first_examples",
    "load_into_pretrained",
    "log_metrics",
    "MeanAccumulator",
    "PairedSums",
    "merge_all",
    "PerModelDataMerge",
]

log = logging.getLogger(__name__)

DATALOADER_KEYS = {"batch_size": 32, "num_workers": 0, "shuffle": False}


def check_dataloader_kwargs(method: str, value: Any) -> dict[str, Any]:
    """``dataloader_kwargs`` with defaults filled in: ``batch_size`` ≥ 1, ``num_workers`` ≥ 0 and
    ``shuffle`` (false: the first images; true: a random subset seeded by the method's ``seed``)."""
    given = to_container(value) or {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"{method}: option 'dataloader_kwargs' must be a mapping; got {given!r}")
    unknown = sorted(set(given) - set(DATALOADER_KEYS))
    if unknown:
        raise ConfigError(f"{method}: unknown dataloader_kwargs {unknown}; valid: {', '.join(DATALOADER_KEYS)}")
    kwargs = {**DATALOADER_KEYS, **given}
    check_int(method, "dataloader_kwargs.batch_size", kwargs["batch_size"], low=1)
    check_int(method, "dataloader_kwargs.num_workers", kwargs["num_workers"], low=0)
    check_bool(method, "dataloader_kwargs.shuffle", kwargs["shuffle"])
    return kwargs


def compile_exclusions(method: str, patterns: Any) -> list[re.Pattern]:
    """``exclude_param_names_regex`` compiled (matched with ``re.match`` against canonical keys)."""
    patterns = to_container(patterns) or []
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        raise ConfigError(f"{method}: option 'exclude_param_names_regex' must be a list of regexes; got {patterns!r}")
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(str(pattern)))
        except re.error as err:
            raise ConfigError(f"{method}: exclude_param_names_regex {pattern!r} is not a regex ({err})") from None
    return compiled


def fabric_or_cpu(fabric: Any) -> Any:
    """The program's Fabric, or a one-CPU Fabric when the method runs outside the program."""
    if fabric is not None:
        return fabric
    import lightning

    return lightning.Fabric(accelerator="cpu", devices=1)


def canonical_parameter_names(modelpool: BaseModelPool, model: nn.Module) -> dict[str, str]:
    """``{parameter name in model: the pool's canonical key}`` (e.g. ``vision_model.`` stripped),
    matched by storage, so it holds for any key layout. Call before moving the model."""
    by_storage = {(t.data_ptr(), tuple(t.shape)): k for k, t in modelpool.canonical_state_dict(model).items()}
    names = {}
    for name, param in model.named_parameters():
        key = by_storage.get((param.data_ptr(), tuple(param.shape)))
        if key is None:
            raise IncompatibleModelsError(f"parameter {name!r} of {type(model).__name__} is not in its state dict")
        names[name] = key
    return names


def first_examples(dataset: Any, n: int, *, shuffle: bool, seed: int) -> Any:
    """The first ``n`` rows of ``dataset`` (``shuffle``: ``n`` rows drawn without replacement, seeded)."""
    n = min(n, len(dataset))
    if shuffle:
        indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    else:
        indices = list(range(n))
    if hasattr(dataset, "select"):
        return dataset.select(indices)
    return torch.utils.data.Subset(dataset, indices)


@torch.no_grad()
def load_into_pretrained(modelpool: BaseModelPool, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """The ``_pretrained_`` model with ``tensors`` (canonical keys) copied in, cast to its dtypes."""
    model = modelpool.load_pretrained_model()
    own = modelpool.canonical_state_dict(model)
    for key, value in tensors.items():
        own[key].copy_(value.to(own[key].dtype))
    return model.eval()


def log_metrics(fabric: Any, metrics: Mapping[str, float], step: int) -> None:
    """Log ``metrics`` to the Fabric's loggers (if any) and flush them."""
    loggers = getattr(fabric, "loggers", None) or []
    if not loggers:
        return
    fabric.log_dict(dict(metrics), step=step)
    for logger in loggers:
        if hasattr(logger, "save"):
            logger.save()


class MeanAccumulator:
    """``Σ θ_i`` of tensors, in the order added; :meth:`result` divides by the number of models."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            if key in self.sums:
                self.sums[key] += value
            else:
                self.sums[key] = value.detach().clone()
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        return {key: total / self.count for key, total in self.sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums, self.count = dict(state["sums"]), int(state["count"])


class PairedSums:
    """Per key, the running sums of two statistics over the models (e.g. a numerator and a denominator),
    plus the mean of the other tensors (:attr:`others`); subclasses fold models in with :meth:`add_pair`
    and say in :meth:`combine` how a key's two sums give the merged tensor."""

    def __init__(self) -> None:
        self.sums: dict[str, list[torch.Tensor]] = {}
        self.others = MeanAccumulator()

    def add_pair(self, key: str, first: torch.Tensor, second: torch.Tensor) -> None:
        if key in self.sums:
            self.sums[key][0] += first
            self.sums[key][1] += second
        else:
            self.sums[key] = [first, second]

    def combine(self, key: str, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:
        """The merged tensors: ``combine`` of each key's sums, the mean for the others."""
        return {**self.others.result(), **{key: self.combine(key, a, b) for key, (a, b) in self.sums.items()}}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "others": self.others.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums = {key: list(pair) for key, pair in state["sums"].items()}
        self.others.load_state_dict(state["others"])


def merge_all(
    acc: Any, params: Sequence[Mapping[str, torch.Tensor]], statistics: Sequence[Any]
) -> dict[str, torch.Tensor]:
    """Fold every ``(params_i, statistic_i)`` into ``acc`` in order and return ``acc.result()``."""
    for p, stat in zip(params, statistics):
        acc.add(p, stat)
    return acc.result()


def architecture_fingerprint(modelpool: BaseModelPool, keys: Sequence[str]) -> str:
    """A short hash of the pool's tensor names and shapes (what a checkpoint must match)."""
    source = modelpool.tensor_source(PRETRAINED)
    text = ";".join(f"{k}:{tuple(source.shape_dtype(k)[0])}" for k in keys)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class PerModelDataMerge(BaseAlgorithm):
    """Template of the merges that take one statistic per model from its task's data (see module doc).

    Subclasses are registered (which sets :attr:`name`), call :meth:`_init_data_options` in ``__init__`` and implement
    :meth:`_new_accumulator` and :meth:`_add_model`, and extend :meth:`_options`.
    """

    def _init_data_options(
        self,
        *,
        num_examples: tuple[str, int],
        dataloader_kwargs: Any,
        exclude_param_names_regex: Any,
        seed: int,
        checkpoint_path: str | None,
    ) -> None:
        """Validate and keep the shared options; ``num_examples`` is ``(option name, value)``."""
        self.dataloader_kwargs = check_dataloader_kwargs(self.name, dataloader_kwargs)
        self._exclusions = compile_exclusions(self.name, exclude_param_names_regex)
        self.exclude_param_names_regex = [p.pattern for p in self._exclusions]
        self._num_examples_option = num_examples[0]
        self._num_examples = check_int(self.name, num_examples[0], num_examples[1], low=1)
        self.seed = check_int(self.name, "seed", seed, low=0)
        self.checkpoint_path = checkpoint_path or None
        self.per_model: dict[str, dict[str, Any]] = {}

    # ---- to implement ---------------------------------------------------------------------
    def _new_accumulator(self) -> Any:
        raise NotImplementedError

    def _add_model(
        self,
        acc: Any,
        name: str,
        model: nn.Module,
        batches: Iterator[torch.Tensor],
        fabric: Any,
        data: CLIPTaskClassifiers,
    ) -> dict[str, Any]:
        """Compute model ``name``'s statistic from ``batches`` and fold it into ``acc``; return report entries."""
        raise NotImplementedError

    def _options(self) -> dict[str, Any]:
        """The options a checkpoint must have been made with (subclasses add theirs)."""
        return {
            self._num_examples_option: self._num_examples,
            "exclude_param_names_regex": self.exclude_param_names_regex,
            "dataloader_kwargs": self.dataloader_kwargs,
            "seed": self.seed,
        }

    def _clip_model(self) -> Any:
        return None

    # ---- the run ----------------------------------------------------------------------------
    def is_excluded(self, key: str) -> bool:
        return any(p.match(key) for p in self._exclusions)

    def _validate_pool(self, modelpool: BaseModelPool) -> tuple[CLIPTaskClassifiers, list[str], list[str]]:
        """Check the pool before any heavy work; return the task data, the model names and the tensor keys."""
        names = modelpool.model_names
        if not names:
            raise ConfigError(f"{self.name}: the pool has no fine-tuned models; models: {modelpool.all_model_names}")
        if not modelpool.has_pretrained:
            raise ConfigError(
                f"{self.name}: the pool needs a {PRETRAINED!r} model; models: {modelpool.all_model_names}"
            )
        data = CLIPTaskClassifiers(modelpool, clip_model=self._clip_model(), what=self.name)
        data.check_tasks("train", names)
        keys = check_pool_compatible(modelpool, [PRETRAINED, *names])
        for pattern in self._exclusions:
            if not any(pattern.match(k) for k in keys):
                raise ConfigError(
                    f"{self.name}: exclude_param_names_regex {pattern.pattern!r} matches no tensor; "
                    f"tensors are named like {keys[0]!r} (matched from the start with re.match)"
                )
        return data, names, keys

    def model_tensors(self, modelpool: BaseModelPool, name: str, model: nn.Module) -> dict[str, torch.Tensor]:
        """The float tensors of ``model`` that are merged (canonical keys, exclusions removed), on CPU,
        checked finite; non-float tensors must equal the pre-trained model's."""
        tensors = {}
        for key, value in modelpool.canonical_state_dict(model).items():
            if self.is_excluded(key):
                continue
            if not value.is_floating_point():
                if not torch.equal(value.cpu(), modelpool.get_tensor(PRETRAINED, key)):
                    raise IncompatibleModelsError(f"model {name!r}, non-float tensor {key!r} differs from the base")
                continue
            check_finite(name, key, value)
            tensors[key] = value.detach().cpu().float()
        return tensors

    def _batches(self, data: CLIPTaskClassifiers, index: int, task: str, fabric: Any) -> Iterator[torch.Tensor]:
        dataset = data.dataset("train", task)
        if len(dataset) < self._num_examples:
            log.warning(
                "%s: train dataset %r has %d images, fewer than %s=%d; using all of them",
                self.name,
                task,
                len(dataset),
                self._num_examples_option,
                self._num_examples,
            )
        subset = first_examples(
            dataset, self._num_examples, shuffle=self.dataloader_kwargs["shuffle"], seed=self.seed + index
        )
        loader = data.loader(
            subset,
            batch_size=self.dataloader_kwargs["batch_size"],
            num_workers=self.dataloader_kwargs["num_workers"],
            what=f"train dataset {task!r}",
        )
        for pixel_values, _labels in tqdm(loader, desc=f"{self.name}: {task}", leave=False, disable=None):
            yield fabric.to_device(pixel_values)

    def _checkpoint_meta(self, modelpool: BaseModelPool, names: list[str], keys: list[str]) -> dict[str, Any]:
        return {
            "method": self.name,
            "models": list(names),
            "architecture": architecture_fingerprint(modelpool, keys),
            "options": self._options(),
        }

    def _resume(self, acc: Any, meta: Mapping[str, Any]) -> list[str]:
        if self.checkpoint_path is None or not Path(self.checkpoint_path).expanduser().is_file():
            return []
        state = load_checkpoint(self.checkpoint_path, expect=meta, what=f"{self.name}: checkpoint")
        acc.load_state_dict(state["accumulator"])
        self.per_model = {k: dict(v) for k, v in state["per_model"].items()}
        log.info("%s: resuming from %s after %s", self.name, self.checkpoint_path, state["done"])
        return list(state["done"])

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """Merge the pool's fine-tuned models (one at a time) and return the merged model."""
        data, names, keys = self._validate_pool(modelpool)
        fabric = fabric_or_cpu(self.fabric)
        self.per_model = {}
        acc = self._new_accumulator()
        meta = self._checkpoint_meta(modelpool, names, keys)
        done = self._resume(acc, meta)
        for index, name in enumerate(tqdm(names, desc=self.name, disable=None)):
            if name in done:
                continue
            start = time.perf_counter()
            model = modelpool.load_model(name)
            entry = self._add_model(acc, name, model, self._batches(data, index, name, fabric), fabric, data)
            entry["seconds"] = round(time.perf_counter() - start, 3)
            self.per_model[name] = entry
            log_metrics(fabric, {f"{self.name}/{name}/{k}": float(v) for k, v in entry.items()}, step=index)
            done.append(name)
            if self.checkpoint_path is not None:
                save_checkpoint(
                    self.checkpoint_path,
                    {"accumulator": acc.state_dict(), "done": list(done), "per_model": self.per_model},
                    meta=meta,
                )
            del model
        return load_into_pretrained(modelpool, acc.result())

    def extra_report(self) -> dict[str, Any]:
        """Per model: images used, seconds, and the method's own numbers."""
        return {self.name: dict(self.per_model)} if self.per_model else {}
