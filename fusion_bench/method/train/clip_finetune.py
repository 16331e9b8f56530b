"""``clip_finetune``: fine-tune a CLIP vision encoder on one task against its frozen zero-shot head.

Ilharco et al., *Editing Models with Task Arithmetic*, ICLR 2023. https://arxiv.org/abs/2212.04089
(the experts of the task-vector benchmarks): full fine-tuning of the vision encoder, the text
tower frozen; the classifier is the task's zero-shot head (class names in prompt templates,
encoded by the text tower), so logits = ``exp(logit_scale) · normalise(proj(image)) · Wᵀ`` and
the loss is their cross-entropy. Adam, weight decay 0, ``num_steps`` steps of ``batch_size``
images; a fixed learning rate (the published experts: 1e-5, 4000 steps, batch 32) or a cosine
decay to 0. One call fine-tunes one expert: the pool's ``_pretrained_`` vision encoder on the
pool's train dataset ``task``.

Variants (one training loop): ``use_lora`` trains only LoRA factors on the vision encoder
(Hu et al. 2021, https://arxiv.org/abs/2106.09685; the published LoRA experts: ``q_proj``/``v_proj``, r 16, alpha 32,
dropout 0.1, the published experts 2000 steps); ``use_l_lora`` linearises every LoRA layer around its
initialisation (L-LoRA, Tang et al. 2024, https://arxiv.org/abs/2310.04742), computed with
``torch.func.jvp``. Those save a peft adapter folder that :class:`~fusion_bench.modelpool.CLIPVisionLoRAModelPool`
loads, and return the folded ``CLIPVisionModel`` (:mod:`fusion_bench.models.linearized.lora`).

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

from fusion_bench.errors import ConfigError
from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers, cycle
from fusion_bench.method._options import check_bool, check_choice, check_int, check_range
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import PRETRAINED, BaseModelPool
from fusion_bench.models.hf_clip import vision_state_dict
from fusion_bench.utils.instantiate import to_container

__all__ = ["CLIPFinetuneAlgorithm", "finetune_classifier"]

NAME = "clip_finetune"
LR_SCHEDULERS = ("fixed", "cosine")
# the published LoRA experts (r 16, alpha 32, q/v projections, dropout 0.1)
DEFAULT_LORA_CONFIG = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1}


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
            plus the pool's processor, atomically), or the adapter folder for LoRA / L-LoRA; None: not saved.
        use_lora: train LoRA factors only (the vision encoder frozen).
        use_l_lora: train linearised LoRA (L-LoRA); implies ``use_lora``.
        lora_config: ``{r, lora_alpha, target_modules, lora_dropout}`` (missing keys: the published experts' values).
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
        use_lora: bool = False,
        use_l_lora: bool = False,
        lora_config: Mapping[str, Any] | None = None,
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
        self.use_lora = check_bool(NAME, "use_lora", use_lora)
        self.use_l_lora = check_bool(NAME, "use_l_lora", use_l_lora)
        self.lora_config = _check_lora_config(to_container(lora_config))
        self.losses: list[float] = []

    @property
    def variant(self) -> str:
        """``"full"``, ``"lora"`` or ``"l_lora"``."""
        return "l_lora" if self.use_l_lora else "lora" if self.use_lora else "full"

    def _task(self, modelpool: BaseModelPool) -> str:
        names = modelpool.train_dataset_names
        if self.task is None and len(names) == 1:
            return names[0]
        if self.task is None or self.task not in names:
            what = "choose one with method.task" if self.task is None else f"task {self.task!r} is not among them"
            raise ConfigError(f"{NAME}: the pool's train datasets are {names}; {what}")
        return str(self.task)

    def _heads(self, modelpool: BaseModelPool, task: str) -> CLIPTaskClassifiers:
        text = {task: {"classnames": self.classnames, "templates": self.templates}}
        return CLIPTaskClassifiers(
            modelpool, clip_model=self.clip_model, task_text=text, head_cache_dir=None, what=NAME
        )

    def _fabric(self) -> Any:
        if self.fabric is not None:
            return self.fabric
        import lightning

        return lightning.Fabric(accelerator="cpu", devices=1)

    def _trainable(self, modelpool: BaseModelPool, vision: nn.Module) -> nn.Module:
        """The model to train: ``vision`` itself, or a (linearised) LoRA model on it."""
        if self.variant == "full":
            return vision
        from fusion_bench.models.linearized import new_lora_vision_model

        entry = modelpool.get_model_config(PRETRAINED)
        base_name = entry.get("pretrained_model_name_or_path") if isinstance(entry, Mapping) else None
        self._base_weights = {
            k: v.detach().clone()
            for k, v in vision_state_dict(vision).items()
            if k.endswith(".weight") and k.split(".")[-2] in self.lora_config["target_modules"]
        }
        return new_lora_vision_model(
            vision, **self.lora_config, linearized=self.use_l_lora, seed=self.seed, base_model_name_or_path=base_name
        )

    def _setup(self, modelpool: BaseModelPool) -> tuple[str, nn.Module, list[Any]]:
        """``(task label, classifier to train, train loaders)``: one task's head and loader."""
        task = self._task(modelpool)
        heads = self._heads(modelpool, task)
        classifier = heads.classifier(self._trainable(modelpool, modelpool.load_pretrained_model()), task)
        loader = heads.loader(
            heads.dataset("train", task),
            batch_size=self.batch_size,
            shuffle=True,
            seed=self.seed,
            num_workers=self.num_workers,
            drop_last=True,
            what=f"train dataset {task!r}",
        )
        return task, classifier, [loader]

    def _batches(self, loaders: Sequence[Any]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The endless stream of training batches over the (device-ready) ``loaders``."""
        return cycle(loaders[0])

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """Fine-tune, save if ``save_path`` is set, and return the fine-tuned vision encoder
        (LoRA / L-LoRA: folded into a plain ``CLIPVisionModel``)."""
        task, classifier, loaders = self._setup(modelpool)
        fabric = self._fabric()
        params = [p for p in classifier.vision_model.parameters() if p.requires_grad]
        self.trainable_params = sum(p.numel() for p in params)
        optimizer = torch.optim.Adam(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        classifier, optimizer = fabric.setup(classifier, optimizer)
        scheduler = None
        if self.lr_scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / self.num_steps))
            )
        batches = self._batches([fabric.setup_dataloaders(loader, move_to_device=True) for loader in loaders])
        self.task_name = task
        self.losses = finetune_classifier(
            classifier, batches, optimizer, num_steps=self.num_steps, scheduler=scheduler, backward=fabric.backward
        )
        vision = classifier.module.vision_model if hasattr(classifier, "module") else classifier.vision_model
        vision = vision.cpu().eval()
        if self.variant != "full":
            return self._save_adapter_and_fold(vision, task)
        if self.save_path is not None:
            modelpool.save_model(vision, self.save_path, description=self._model_card(task))
        return vision

    def _save_adapter_and_fold(self, model: nn.Module, task: str) -> nn.Module:
        from fusion_bench.models.linearized import merge_lora_model, save_lora_adapter

        if self.save_path is not None:
            base_name = model.peft_config["default"].base_model_name_or_path
            save_lora_adapter(
                model,
                self.save_path,
                kind=self.variant,
                base_model_name_or_path=base_name,
                base_weights=self._base_weights,
                description=self._model_card(task),
            )
        return merge_lora_model(model)

    def _model_card(self, task: str) -> str:
        options = {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and k not in ("fabric", "losses", "save_path", "trainable_params")
        }
        kind = {"full": "CLIP vision encoder", "lora": "LoRA adapter", "l_lora": "L-LoRA adapter"}[self.variant]
        return f"# {kind} fine-tuned on {task!r}\n\nMade with FusionBench `{NAME}`: {options}\n"

    def extra_report(self) -> dict[str, Any]:
        """The task and the loss at the start and end of training (mean of 10 steps)."""
        if not self.losses:
            return {}
        window = min(10, len(self.losses))
        first, last = self.losses[:window], self.losses[-window:]
        return {
            NAME: {
                "task": self.task_name,
                "variant": self.variant,
                "trainable_params": self.trainable_params,
                "num_steps": self.num_steps,
                "loss_first": sum(first) / window,
                "loss_last": sum(last) / window,
            }
        }


def _check_lora_config(config: Any) -> dict[str, Any]:
    """The LoRA options with the published experts' defaults filled in; a ConfigError naming a bad one."""
    if config is not None and not isinstance(config, Mapping):
        raise ConfigError(
            f"{NAME}: option 'lora_config' must be a mapping {{r, lora_alpha, target_modules, lora_dropout}}; got {config!r}"
        )
    unknown = sorted(set(config or {}) - set(DEFAULT_LORA_CONFIG))
    if unknown:
        raise ConfigError(f"{NAME}: unknown lora_config key(s) {unknown}; valid: {', '.join(DEFAULT_LORA_CONFIG)}")
    out = {**DEFAULT_LORA_CONFIG, **dict(config or {})}
    out["r"] = check_int(NAME, "lora_config.r", out["r"], low=1)
    out["lora_alpha"] = check_range(NAME, "lora_config.lora_alpha", out["lora_alpha"], low=0.0, low_open=True)
    out["lora_dropout"] = check_range(
        NAME, "lora_config.lora_dropout", out["lora_dropout"], low=0.0, high=1.0, high_open=True
    )
    targets = out["target_modules"]
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
        raise ConfigError(
            f"{NAME}: option 'lora_config.target_modules' must be a non-empty list of module names; got {targets!r}"
        )
    out["target_modules"] = list(targets)
    return out
