"""``clip_multitask_finetune``: "traditional MTL", one CLIP vision encoder fine-tuned on all the pool's tasks jointly.

The multi-task upper-bound baseline of the merging tables: instead of one expert per task, a single model is
trained on every task at once. It is :mod:`~fusion_bench.method.train.clip_finetune` (same options, same optimiser,
schedule and full / LoRA / L-LoRA variants) with two differences:

* balanced batches: every step draws ``batch_size`` images from **each** task (``T · batch_size`` in all),
  each task's loader shuffled with its own seed (``seed + i`` for the i-th task);
* the loss is the mean over tasks of each task's cross-entropy against its own frozen zero-shot head. With
  equal per-task batches this equals the cross-entropy averaged over the step's ``T · batch_size`` images,
  so one forward pass serves all tasks (:class:`MultiTaskHeadClassifier`: each image's logits against its
  task's head, padded with ``-inf`` to the widest head, which leaves every softmax unchanged).

``tasks`` picks the tasks (None: all the pool's train datasets). The result is one ``CLIPVisionModel`` that
the task pool evaluates on every task like a merged model.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from fusion_bench.errors import ConfigError
from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers, cycle
from fusion_bench.method.base_algorithm import register_algorithm
from fusion_bench.method.train.clip_finetune import CLIPFinetuneAlgorithm
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.utils.instantiate import to_container

__all__ = ["CLIPMultiTaskFinetuneAlgorithm", "MultiTaskHeadClassifier", "balanced_batches"]

NAME = "clip_multitask_finetune"


class MultiTaskHeadClassifier(nn.Module):
    """Images of several tasks in one batch -> each image's logits against its own task's head.

    The batch holds ``batch_size`` images of each task, in the order of ``heads``. Logits are ``(T·B, C_max)``,
    the columns past a task's class count set to ``-inf`` (zero probability, so the cross-entropy of each row is
    that of its task's head alone).

    Args:
        vision_model: a CLIP vision encoder returning ``pooler_output`` (trained).
        visual_projection: the CLIP model's ``visual_projection`` (frozen).
        logit_scale: the CLIP model's (log) ``logit_scale``.
        heads: the tasks' ``(C_t, D)`` normalised zero-shot heads, in batch order.
        batch_size: images per task in every batch.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        visual_projection: nn.Module,
        logit_scale: torch.Tensor,
        heads: Sequence[torch.Tensor],
        batch_size: int,
    ) -> None:
        super().__init__()
        from fusion_bench.models.zero_shot import CLIPZeroShotClassifier

        self.encoder = CLIPZeroShotClassifier(vision_model, visual_projection, logit_scale, heads[0])
        self.vision_model = vision_model
        self.batch_size = batch_size
        self.num_classes = [int(h.shape[0]) for h in heads]
        width, dim = max(self.num_classes), int(heads[0].shape[1])
        padded = torch.zeros(len(heads), width, dim)
        for t, head in enumerate(heads):
            padded[t, : head.shape[0]] = head.detach().float()
        mask = torch.full((len(heads), width), float("-inf"))
        for t, n in enumerate(self.num_classes):
            mask[t, :n] = 0.0
        self.register_buffer("heads", padded)  # (T, C_max, D)
        self.register_buffer("mask", mask)  # (T, C_max)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        num_tasks = len(self.num_classes)
        if pixel_values.shape[0] != num_tasks * self.batch_size:
            raise ValueError(
                f"{NAME}: a batch holds {self.batch_size} images of each of {num_tasks} tasks; got {pixel_values.shape[0]}"
            )
        embeds = self.encoder.image_embeds(pixel_values).reshape(num_tasks, self.batch_size, -1)  # (T, B, D)
        logits = self.encoder.logit_scale_exp * torch.einsum("tbd,tcd->tbc", embeds, self.heads)
        return (logits + self.mask[:, None, :]).reshape(num_tasks * self.batch_size, -1)  # (T·B, C_max)


def balanced_batches(loaders: Sequence[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(pixel_values, labels)``: one batch of every loader per step, concatenated in loader order."""
    streams = [cycle(loader) for loader in loaders]
    while True:
        parts = [next(stream) for stream in streams]
        yield torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@register_algorithm(NAME)
class CLIPMultiTaskFinetuneAlgorithm(CLIPFinetuneAlgorithm):
    """Fine-tune the pool's ``_pretrained_`` CLIP vision encoder on several train datasets jointly.

    Args:
        tasks: the pool's train datasets to train on (None: all of them).
        batch_size: images **per task** per step.
        classnames / templates: ``{task: [...]}`` overriding the built-in lists (None: built-in).
        (every other option: :class:`~fusion_bench.method.CLIPFinetuneAlgorithm`'s.)
    """

    def __init__(self, *, tasks: Sequence[str] | None = None, **options: Any) -> None:
        if options.get("task") is not None:
            raise ConfigError(f"{NAME}: option 'task' is clip_finetune's; choose the tasks with 'tasks' (a list)")
        options.pop("task", None)
        valid = [n for n in inspect.signature(CLIPFinetuneAlgorithm.__init__).parameters if n not in ("self", "task")]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"{NAME}: unknown option(s) {', '.join(map(repr, unknown))}; valid options: tasks, {', '.join(valid)}"
            )
        super().__init__(**options)
        self.tasks = to_container(tasks)
        if self.tasks is not None and (isinstance(self.tasks, str) or not self.tasks):
            raise ConfigError(f"{NAME}: option 'tasks' must be a non-empty list of train dataset names; got {tasks!r}")
        for opt in ("classnames", "templates"):
            value = getattr(self, opt)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{NAME}: option {opt!r} must map task -> list; got {value!r}")

    def _task_list(self, modelpool: BaseModelPool) -> list[str]:
        names = modelpool.train_dataset_names
        tasks = list(self.tasks) if self.tasks is not None else list(names)
        missing = [t for t in tasks if t not in names]
        if missing or not tasks:
            raise ConfigError(f"{NAME}: the pool's train datasets are {names}; not among them: {missing}")
        return tasks

    def _setup(self, modelpool: BaseModelPool) -> tuple[str, nn.Module, list[Any]]:
        tasks = self._task_list(modelpool)
        text = {
            t: {"classnames": (self.classnames or {}).get(t), "templates": (self.templates or {}).get(t)} for t in tasks
        }
        heads = CLIPTaskClassifiers(
            modelpool, clip_model=self.clip_model, task_text=text, head_cache_dir=None, what=NAME
        )
        vision = self._trainable(modelpool, modelpool.load_pretrained_model())
        clip = heads.clip_model
        classifier = MultiTaskHeadClassifier(
            vision, clip.visual_projection, clip.logit_scale, [heads.head(t) for t in tasks], self.batch_size
        )
        loaders = [
            heads.loader(
                heads.dataset("train", t),
                batch_size=self.batch_size,
                shuffle=True,
                seed=self.seed + i,
                num_workers=self.num_workers,
                drop_last=True,
                what=f"train dataset {t!r}",
            )
            for i, t in enumerate(tasks)
        ]
        self.task_names = tasks
        return ", ".join(tasks), classifier, loaders

    def _batches(self, loaders: Sequence[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return balanced_batches(loaders)

    def extra_report(self) -> dict[str, Any]:
        """The tasks, the variant and the loss at the start and end of training (mean of 10 steps)."""
        report = super().extra_report()
        if not report:
            return {}
        entry = report.pop("clip_finetune")
        entry.pop("task", None)
        return {NAME: {"tasks": self.task_names, "batch_size_per_task": self.batch_size, **entry}}
