"""``clip_finetune``: fine-tune a CLIP vision encoder on one task against its frozen zero-shot head.

Ilharco et al., *Editing Models with Task Arithmetic*, ICLR 2023. https://arxiv.org/abs/2212.04089
(the experts of the task-vector benchmarks): full fine-tuning of the vision encoder, the text
tower frozen; the classifier is the task's zero-shot head (class names in prompt templates,
encoded by the text tower), so logits = ``exp(logit_scale) · normalise(proj(image)) · Wᵀ`` and
the loss is their cross-entropy. Adam, weight decay 0, ``num_steps`` steps of ``batch_size``
images; a fixed learning rate (the published experts: 1e-5, 4000 steps, batch 32) or a cosine
decay to 0. One call fine-tunes one expert: the pool's ``_pretrained_`` vision encoder on the
pool's train dataset ``task``.

Class names and templates: the method's ``classnames``/``templates`` options, else the built-in
lists of the eight CLIP tasks (:mod:`fusion_bench.data.clip_tasks`) or of the mini benchmark
(:mod:`fusion_bench.data.mini_tasks`). Data order is seeded by ``seed``; devices come from the
program's ``lightning.Fabric``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from fusion_bench.data import mini_tasks
from fusion_bench.data.clip_tasks import canonical_task_name, load_classnames_and_templates
from fusion_bench.errors import ConfigError, DatasetError, UnknownNameError
from fusion_bench.method._options import check_choice, check_int, check_range
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import PRETRAINED, BaseModelPool
from fusion_bench.models.hf_clip import load_clip_model
from fusion_bench.models.zero_shot import CLIPZeroShotClassifier, build_zero_shot_classifier
from fusion_bench.utils.instantiate import to_container

__all__ = ["CLIPFinetuneAlgorithm", "finetune_classifier", "task_classnames_and_templates"]

NAME = "clip_finetune"
LR_SCHEDULERS = ("fixed", "cosine")


def task_classnames_and_templates(
    task: str, classnames: Sequence[str] | None = None, templates: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """The class names and prompt templates of ``task``: the given ones, else the built-in ones.

    Args:
        task: the task's name (one of the eight CLIP tasks, or a mini benchmark task).
        classnames: overriding class names (give ``templates`` with them).
        templates: overriding templates, each with one ``{}``.

    Returns:
        ``(classnames, templates)``.

    Raises:
        ConfigError: only one of the two is given, a template lacks ``{}``, or the task has no
            built-in lists.
    """
    if classnames is not None or templates is not None:
        if not classnames or not templates:
            raise ConfigError(f"{NAME}: task {task!r}: give both 'classnames' and 'templates', or neither")
        if any(str(t).count("{}") != 1 for t in templates):
            raise ConfigError(f"{NAME}: task {task!r}: every template needs exactly one '{{}}'; got {list(templates)!r}")
        return [str(c) for c in classnames], [str(t) for t in templates]
    if task in mini_tasks.MINI_TASKS:
        text = mini_tasks.task_text(task)
        return text["classnames"], text["templates"]
    try:
        return load_classnames_and_templates(canonical_task_name(task))
    except UnknownNameError:
        raise ConfigError(
            f"{NAME}: no built-in class names for task {task!r} (known: the eight CLIP tasks and the mini tasks "
            f"{', '.join(mini_tasks.MINI_TASKS)}); give 'classnames' and 'templates'"
        ) from None


def finetune_classifier(
    classifier: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    num_steps: int,
    scheduler: Any = None,
    backward: Any = None,
) -> list[float]:
    """Minimise the cross-entropy of ``classifier``'s logits for ``num_steps`` batches (the core).

    Args:
        classifier: pixel values (B, 3, H, W) -> logits (B, C).
        batches: an endless iterator of ``(pixel_values, labels)`` on the classifier's device.
        optimizer: over the trainable parameters.
        num_steps: optimisation steps.
        scheduler: stepped after each optimiser step (None: a fixed learning rate).
        backward: ``loss -> None`` (the Fabric's ``backward``); None: ``loss.backward()``.

    Returns:
        the loss of every step.
    """
    classifier.train()
    losses = []
    for _ in range(num_steps):
        pixel_values, labels = next(batches)
        loss = F.cross_entropy(classifier(pixel_values), labels)
        optimizer.zero_grad(set_to_none=True)
        (backward or torch.Tensor.backward)(loss)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    classifier.eval()
    return losses


class _Collate:
    """Dataset rows -> ``(pixel_values, labels)``, images converted to RGB."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, rows: list[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [row["image"].convert("RGB") for row in rows]
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return pixels, torch.tensor([int(row["label"]) for row in rows])


def _forever(loader: Any) -> Iterator[Any]:
    """Cycle over ``loader``'s epochs without end."""
    while True:
        yield from loader


@register_algorithm(NAME)
class CLIPFinetuneAlgorithm(BaseAlgorithm):
    """Fine-tune the pool's ``_pretrained_`` CLIP vision encoder on one train dataset.

    Args:
        task: the pool's train dataset to fine-tune on (None: the pool's only one).
        clip_model: the full CLIP giving text tower, ``visual_projection`` and ``logit_scale``
            (path, ``{pretrained_model_name_or_path}`` or ``_target_``); None: the
            ``_pretrained_`` model's entry (a full CLIP checkpoint, as the hub's are).
        classnames / templates: the task's class names and prompts (None: built-in lists).
        learning_rate: Adam's learning rate.
        weight_decay: Adam's (L2) weight decay.
        lr_scheduler: ``"fixed"`` or ``"cosine"`` (decay to 0 over ``num_steps``).
        num_steps: optimisation steps.
        batch_size: images per step.
        seed: seeds the data order.
        num_workers: DataLoader workers.
        save_path: folder to save the fine-tuned ``CLIPVisionModel`` to (``save_pretrained``
            plus the pool's processor, atomically); None: not saved.
    """

    def __init__(
        self,
        *,
        task: str | None = None,
        clip_model: Any = None,
        classnames: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        lr_scheduler: str = "fixed",
        num_steps: int = 4000,
        batch_size: int = 32,
        seed: int = 42,
        num_workers: int = 0,
        save_path: str | None = None,
    ) -> None:
        self.task = task
        self.clip_model = to_container(clip_model)
        self.classnames, self.templates = to_container(classnames), to_container(templates)
        self.learning_rate = check_range(NAME, "learning_rate", learning_rate, low=0.0, low_open=True)
        self.weight_decay = check_range(NAME, "weight_decay", weight_decay, low=0.0)
        self.lr_scheduler = check_choice(NAME, "lr_scheduler", lr_scheduler, LR_SCHEDULERS)
        self.num_steps = check_int(NAME, "num_steps", num_steps, low=1)
        self.batch_size = check_int(NAME, "batch_size", batch_size, low=1)
        self.seed = check_int(NAME, "seed", seed, low=0)
        self.num_workers = check_int(NAME, "num_workers", num_workers, low=0)
        self.save_path = save_path or None
        self.losses: list[float] = []

    def _task(self, modelpool: BaseModelPool) -> str:
        names = modelpool.train_dataset_names
        if self.task is None and len(names) == 1:
            return names[0]
        if self.task is None or self.task not in names:
            what = "choose one with method.task" if self.task is None else f"task {self.task!r} is not among them"
            raise ConfigError(f"{NAME}: the pool's train datasets are {names}; {what}")
        return str(self.task)

    def _classifier(self, modelpool: BaseModelPool, task: str, tokenizer: Any) -> CLIPZeroShotClassifier:
        """The pool's pre-trained vision encoder behind ``task``'s frozen zero-shot head."""
        clip = load_clip_model(self.clip_model or modelpool.get_model_config(PRETRAINED), what=f"{NAME}: clip_model")
        classnames, templates = task_classnames_and_templates(task, self.classnames, self.templates)
        head = build_zero_shot_classifier(clip.eval(), tokenizer, classnames, templates)
        projection = clip.visual_projection.requires_grad_(False)
        return CLIPZeroShotClassifier(modelpool.load_pretrained_model(), projection, clip.logit_scale, head)

    def _loader(self, modelpool: BaseModelPool, task: str, image_processor: Any) -> DataLoader:
        dataset = modelpool.load_train_dataset(task)
        if len(dataset) < self.batch_size:
            raise DatasetError(f"{NAME}: train dataset {task!r} has {len(dataset)} samples, fewer than batch_size {self.batch_size}")
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=generator,
                          num_workers=self.num_workers, collate_fn=_Collate(image_processor))  # fmt: skip

    def _fabric(self) -> Any:
        if self.fabric is not None:
            return self.fabric
        import lightning

        return lightning.Fabric(accelerator="cpu", devices=1)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """Fine-tune, save if ``save_path`` is set, and return the fine-tuned vision encoder."""
        task = self._task(modelpool)
        processor = modelpool.load_processor()
        classifier = self._classifier(modelpool, task, getattr(processor, "tokenizer", processor))
        loader = self._loader(modelpool, task, getattr(processor, "image_processor", processor))
        fabric = self._fabric()
        params = [p for p in classifier.vision_model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        classifier, optimizer = fabric.setup(classifier, optimizer)
        scheduler = None
        if self.lr_scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / self.num_steps)))
        batches = _forever(fabric.setup_dataloaders(loader, move_to_device=True))
        self.task_name = task
        self.losses = finetune_classifier(classifier, batches, optimizer, num_steps=self.num_steps, scheduler=scheduler,
                                          backward=fabric.backward)  # fmt: skip
        vision = classifier.module.vision_model if hasattr(classifier, "module") else classifier.vision_model
        vision = vision.cpu().eval()
        if self.save_path is not None:
            modelpool.save_model(vision, self.save_path, description=self._model_card(task))
        return vision

    def _model_card(self, task: str) -> str:
        options = {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("fabric", "losses", "save_path")}
        return f"# CLIP vision encoder fine-tuned on {task!r}\n\nMade with FusionBench `{NAME}`: {options}\n"

    def extra_report(self) -> dict[str, Any]:
        """The task and the loss at the start and end of training (mean of 10 steps)."""
        if not self.losses:
            return {}
        window = min(10, len(self.losses))
        first, last = self.losses[:window], self.losses[-window:]
        return {NAME: {"task": self.task_name, "num_steps": self.num_steps,
                       "loss_first": sum(first) / window, "loss_last": sum(last) / window}}  # fmt: skip
