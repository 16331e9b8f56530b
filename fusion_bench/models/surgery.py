"""Representation Surgery: a per-task module that moves the merged model's features towards each expert's.

Yang et al., *Representation Surgery for Multi-Task Model Merging*, ICML 2024. https://arxiv.org/abs/2402.02705

For task t, the merged encoder's normalised projected image features z become
``z′ = z − W_up,t ReLU(W_down,t z)`` (:class:`SurgeryModule`: ``W_down`` (h × D), ``W_up`` (D × h), no biases;
``W_up`` starts at 0, so z′ = z before training). The class logits are ``exp(logit_scale) · head · z′`` (z′ is
not normalised again, as the reference).

The surgery needs the task at inference: :class:`SurgeryCLIPVisionModel` follows the task-conditioned
protocol (``task_names`` and ``for_task(task)``), which the CLIP task pool evaluates task by task;
``for_task(t)`` is the shared merged encoder with task t's module as its ``transform_image_embeds``, which
:class:`~fusion_bench.models.zero_shot.CLIPZeroShotClassifier` applies to the normalised features. Called
directly, the model is the merged encoder (no surgery).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_bench.models.hf_clip import CLIPVisionModelWrapper

__all__ = ["SurgeryModule", "SurgeryEncoder", "SurgeryCLIPVisionModel", "SURGERY_FILE", "SURGERY_CONFIG"]

SURGERY_FILE = "surgery.safetensors"
SURGERY_CONFIG = "surgery.json"


class SurgeryModule(nn.Module):
    """``z -> z − W_up ReLU(W_down z)``.

    Args:
        dim: the feature dimension D (the CLIP projection's output).
        hidden_dim: h.
        generator: seeds ``W_down``'s initialisation (``nn.Linear``'s default: Kaiming uniform with a = √5);
            ``W_up`` starts at 0.
    """

    def __init__(self, dim: int, hidden_dim: int = 16, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.down = nn.Parameter(torch.empty(hidden_dim, dim))
        self.up = nn.Parameter(torch.zeros(dim, hidden_dim))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=generator)

    def forward(self, features: Tensor) -> Tensor:
        return features - F.linear(F.relu(F.linear(features, self.down)), self.up)


class SurgeryEncoder(CLIPVisionModelWrapper):
    """The merged encoder with one task's surgery applied to its normalised projected features."""

    def __init__(self, vision_model: nn.Module, surgery: SurgeryModule) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.surgery = surgery

    def forward(self, pixel_values: Tensor | None = None, **kwargs: Any) -> Any:
        return self.vision_model(pixel_values=pixel_values, **kwargs)

    def transform_image_embeds(self, embeds: Tensor) -> Tensor:
        """The surgery on normalised projected features ``(B, D)``."""
        return self.surgery(embeds.to(self.surgery.down.dtype))


class SurgeryCLIPVisionModel(CLIPVisionModelWrapper):
    """A merged CLIP vision encoder with one surgery module per task (see the module docstring).

    Args:
        vision_model: the merged encoder (shared by every task).
        surgeries: ``{task: SurgeryModule}``.
        meta: what it was built from (method, models, options), saved with it.
    """

    def __init__(self, vision_model: nn.Module, surgeries: Mapping[str, SurgeryModule], *, meta: Mapping[str, Any]):
        super().__init__()
        self.vision_model = vision_model
        self.surgeries = nn.ModuleDict(dict(surgeries))
        self.meta = dict(meta)

    @property
    def task_names(self) -> list[str]:
        return list(self.surgeries)

    def for_task(self, task: str) -> SurgeryEncoder:
        """The encoder to evaluate on ``task``'s inputs."""
        return SurgeryEncoder(self.vision_model, self.surgeries[task])

    def forward(self, pixel_values: Tensor | None = None, **kwargs: Any) -> Any:
        return self.vision_model(pixel_values=pixel_values, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """The merged encoder as a Hugging Face folder, plus ``surgery.safetensors`` (``<task>.down`` /
        ``<task>.up``) and ``surgery.json`` (the tasks and what built them)."""
        from pathlib import Path

        from safetensors.torch import save_file

        self.vision_model.save_pretrained(save_directory, **kwargs)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.surgeries.state_dict().items()}
        save_file(tensors, str(Path(save_directory) / SURGERY_FILE))
        meta = {**self.meta, "tasks": self.task_names}
        (Path(save_directory) / SURGERY_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
