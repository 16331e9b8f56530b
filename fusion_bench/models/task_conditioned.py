"""Models that need to know the task at inference (TALL masks, EMR-Merging): the protocol and one implementation.

**Protocol.** A task-conditioned model exposes ``task_names`` (the tasks it has a model for) and
``for_task(task) -> nn.Module``, which returns the encoder to use on ``task``'s inputs. The CLIP task
pool (:class:`~fusion_bench.taskpool.CLIPVisionModelTaskPool`) checks, before evaluating, that every
task it evaluates is in ``task_names`` (one error naming the missing tasks otherwise) and then
evaluates ``for_task(task)`` on each task. Any ``nn.Module`` with these two members qualifies
(:func:`is_task_conditioned`); it need not subclass anything here.

**Implementation.** :class:`MaskedTaskVectorModel` holds one backbone and, per task, a boolean mask
and a scale over one shared task vector: ``for_task(t)`` sets the backbone's parameters to
``θ0 + s_t · (m_t ⊙ τ)`` (recomputed from θ0 each time, so switching tasks never accumulates
rounding) and returns the backbone. Memory: one backbone, θ0 and τ of the merged tensors, and one
boolean per entry per task. ``save_pretrained(dir)`` (``merged_model_save_path``) writes each task's
model as its own folder ``dir/<task>/``.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from fusion_bench.errors import ConfigError

__all__ = [
    "TaskConditionedModel",
    "is_task_conditioned",
    "check_tasks_covered",
    "check_task_names",
    "save_module",
    "MaskedTaskVectorModel",
]


@runtime_checkable
class TaskConditionedModel(Protocol):
    """A model that returns a task-specific model for each task it knows."""

    task_names: Sequence[str]

    def for_task(self, task: str) -> nn.Module:
        """The model to evaluate on ``task``'s inputs."""
        ...


def is_task_conditioned(model: Any) -> bool:
    """Whether ``model`` follows the :class:`TaskConditionedModel` protocol."""
    return callable(getattr(model, "for_task", None)) and getattr(model, "task_names", None) is not None


def check_tasks_covered(model: Any, tasks: Sequence[str], *, what: str = "taskpool") -> None:
    """Raise :class:`ConfigError` naming the tasks of ``tasks`` that ``model`` has no model for."""
    check_task_names(list(model.task_names), tasks, what=what)


def check_task_names(known: Sequence[str], tasks: Sequence[str], *, what: str = "taskpool") -> None:
    """Raise :class:`ConfigError` naming the tasks of ``tasks`` not in ``known`` (the tasks a task-conditioned
    model has, i.e. the model pool's model names). The program calls it before merging for methods whose class
    sets ``needs_task_at_inference = True``."""
    missing = [t for t in tasks if t not in known]
    if missing:
        raise ConfigError(
            f"{what}: the merged model needs the task at inference and has no model for task(s) "
            f"{', '.join(map(repr, missing))} (it knows {', '.join(map(repr, known))}); evaluate it on "
            "tasks named like the pool's models"
        )


def save_module(module: nn.Module, directory: Any) -> None:
    """``module.save_pretrained(directory)`` when it has it, else its state dict as ``model.safetensors``."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_pretrained"):
        module.save_pretrained(directory)
        return
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(directory / "model.safetensors")
    )


class MaskedTaskVectorModel(nn.Module):
    """``for_task(t)``: the backbone with ``θ0 + scale_t · (mask_t ⊙ vector)`` in every merged tensor.

    Args:
        backbone: the model whose parameters are set per task (its other tensors stay as they are).
        base: θ0 of every merged tensor, keyed by the backbone's parameter names.
        vector: the shared task vector τ (same keys and shapes).
        masks: ``{task: {key: bool tensor}}``, one mask per merged tensor and task.
        scales: ``{task: s_t}`` (1 for TALL masks, the rescaler for EMR).
    """

    def __init__(
        self,
        backbone: nn.Module,
        base: Mapping[str, Tensor],
        vector: Mapping[str, Tensor],
        masks: Mapping[str, Mapping[str, Tensor]],
        scales: Mapping[str, float],
    ) -> None:
        super().__init__()
        if set(masks) != set(scales):
            raise ConfigError(f"masks for {sorted(masks)} but scales for {sorted(scales)}")
        params = dict(backbone.named_parameters())
        unknown = sorted(set(vector) - set(params))
        if unknown or set(base) != set(vector):
            raise ConfigError(f"the task vector's keys must be parameters of the backbone; unknown: {unknown[:5]}")
        self.backbone = backbone
        self.task_names = list(masks)
        self._keys = sorted(vector)
        self._base = {k: base[k].detach().clone() for k in self._keys}
        self._vector = {k: vector[k].detach().clone() for k in self._keys}
        self._masks = {t: {k: masks[t][k].to(torch.bool) for k in self._keys} for t in self.task_names}
        self._scales = {t: float(s) for t, s in scales.items()}
        self.current_task: str | None = None

    def task_delta(self, task: str, key: str) -> Tensor:
        """``scale_t · (mask_t ⊙ τ)`` of one tensor."""
        return self._vector[key] * self._masks[task][key] * self._scales[task]

    @torch.no_grad()
    def for_task(self, task: str) -> nn.Module:
        """Set the backbone to ``task``'s model and return it."""
        if task not in self._masks:
            raise ConfigError(f"no model for task {task!r}; known tasks: {', '.join(map(repr, self.task_names))}")
        params = dict(self.backbone.named_parameters())
        for key in self._keys:
            param = params[key]
            param.copy_(self._base[key].to(param.device) + self.task_delta(task, key).to(param.device))
        self.current_task = task
        return self.backbone

    def task_state_dict(self, task: str) -> dict[str, Tensor]:
        """The merged tensors of ``task``'s model (fresh tensors; the backbone is not touched)."""
        return {k: self._base[k] + self.task_delta(task, k) for k in self._keys}

    def mask_density(self) -> dict[str, float]:
        """The fraction of entries each task's mask keeps."""
        total = sum(self._vector[k].numel() for k in self._keys)
        return {t: sum(int(m.sum()) for m in self._masks[t].values()) / max(total, 1) for t in self.task_names}

    def save_pretrained(self, save_directory: str, **_: Any) -> None:
        """Write each task's model as its own folder, ``save_directory/<task>/`` (``merged_model_save_path``)."""
        from pathlib import Path

        for task in self.task_names:
            save_module(self.for_task(task), Path(save_directory) / task)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.current_task is None:
            raise ConfigError(
                "this model needs the task at inference: call for_task(task) first (the CLIP task pool does)"
            )
        return self.backbone(*args, **kwargs)
