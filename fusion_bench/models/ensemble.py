"""Output ensembles of CLIP vision encoders: every member sees the image, their outputs are combined.

The CLIP task pool projects and normalises the encoder's ``pooler_output`` and scores it against the
task's zero-shot head, so an ensemble that combines the members' ``pooler_output`` (and
``last_hidden_state``) is evaluated like any encoder. This is what the reference FusionBench's
``EnsembleModule`` / ``WeightedEnsembleModule`` / ``MaxModelPredictor`` do to a CLIP vision model's
output (every tensor field combined): the mean, a weighted sum, or the element-wise maximum of the
pooled features, *before* the projection, normalisation and head.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.errors import ConfigError
from fusion_bench.models.hf_clip import CLIPVisionModelWrapper

__all__ = ["mean_outputs", "weighted_outputs", "max_outputs", "EnsembleCLIPVisionModel"]

Combine = Callable[[Sequence[Tensor]], Tensor]


def mean_outputs(outputs: Sequence[Tensor]) -> Tensor:
    """``mean_i outputs[i]`` (``torch.stack(...).mean(0)``, as the reference)."""
    return torch.stack(list(outputs)).mean(dim=0)


def weighted_outputs(outputs: Sequence[Tensor], weights: Tensor) -> Tensor:
    """``Σ_i weights[i] · outputs[i]`` (``(stack · w).sum(0)``, as the reference)."""
    stacked = torch.stack(list(outputs))
    w = weights.to(device=stacked.device, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    return (stacked * w).sum(dim=0)


def max_outputs(outputs: Sequence[Tensor]) -> Tensor:
    """The element-wise maximum over the members."""
    return torch.stack(list(outputs)).max(dim=0).values


class EnsembleCLIPVisionModel(CLIPVisionModelWrapper):
    """Stands in for a CLIP vision encoder: runs every member and combines their outputs.

    Args:
        models: the members (CLIP vision encoders), in pool order.
        mode: ``"mean"``, ``"weighted"`` (needs ``weights``) or ``"max"``.
        weights: one weight per member (``mode="weighted"`` only), used as given.
        names: the members' names (default ``member_<i>``), for :meth:`save_pretrained`.
    """

    MODES = ("mean", "weighted", "max")

    def __init__(
        self,
        models: Sequence[nn.Module],
        *,
        mode: str = "mean",
        weights: Sequence[float] | None = None,
        names: Sequence[str] | None = None,
    ):
        super().__init__()
        if not models:
            raise ConfigError("an ensemble needs at least one model")
        if mode not in self.MODES:
            raise ConfigError(f"ensemble mode must be one of {', '.join(map(repr, self.MODES))}; got {mode!r}")
        if (mode == "weighted") != (weights is not None):
            raise ConfigError("give 'weights' exactly when the ensemble mode is 'weighted'")
        if weights is not None and len(weights) != len(models):
            raise ConfigError(f"{len(weights)} weights for {len(models)} models; give one weight per model")
        self.model_list = nn.ModuleList(models)
        self.member_names = list(names) if names is not None else [f"member_{i}" for i in range(len(models))]
        if len(self.member_names) != len(models):
            raise ConfigError(f"{len(self.member_names)} names for {len(models)} models")
        self.mode = mode
        self.register_buffer(
            "weights", torch.tensor([float(w) for w in weights or []], dtype=torch.float32), persistent=True
        )

    def combine(self, outputs: Sequence[Tensor]) -> Tensor:
        """Combine one output field of every member."""
        if self.mode == "mean":
            return mean_outputs(outputs)
        if self.mode == "weighted":
            return weighted_outputs(outputs, self.weights)
        return max_outputs(outputs)

    def save_pretrained(self, save_directory: str, **_: object) -> None:
        """Write every member as ``save_directory/<name>/`` and ``ensemble.json`` (mode, weights, members)."""
        import json
        from pathlib import Path

        from fusion_bench.models.task_conditioned import save_module

        for name, model in zip(self.member_names, self.model_list):
            save_module(model, Path(save_directory) / name)
        meta = {"mode": self.mode, "weights": self.weights.tolist() or None, "members": self.member_names}
        (Path(save_directory) / "ensemble.json").write_text(json.dumps(meta, indent=2) + "\n")

    def forward(self, pixel_values: Tensor, **kwargs) -> object:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        outputs = [model(pixel_values=pixel_values, **kwargs) for model in self.model_list]
        return BaseModelOutputWithPooling(
            last_hidden_state=self.combine([o.last_hidden_state for o in outputs]),
            pooler_output=self.combine([o.pooler_output for o in outputs]),
        )
