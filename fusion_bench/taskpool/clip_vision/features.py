"""Save each encoder layer's output during evaluation (forward hooks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion_bench.models.hf_clip import vision_encoder_layers
from fusion_bench.utils.io import atomic_write

__all__ = ["LayerWiseFeatureSaver"]


class LayerWiseFeatureSaver:
    """Collect the hidden states after every encoder layer and save them as safetensors.

    The file holds ``layer_{i}``: (N, D) with ``first_token_only`` (the class token) or
    (N, T, D) otherwise, float32, for the first ``max_num`` samples (all if None).
    """

    def __init__(self, vision_model: nn.Module, path: Path, *, first_token_only: bool, max_num: int | None):
        self.path = Path(path)
        self.first_token_only = first_token_only
        self.max_num = max_num
        layers = vision_encoder_layers(vision_model)
        self.features: list[list[torch.Tensor]] = [[] for _ in layers]
        self._count = [0] * len(layers)
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, D)
            if self.first_token_only:
                hidden = hidden[:, 0]  # (B, D)
            if self.max_num is not None:
                hidden = hidden[: max(self.max_num - self._count[index], 0)]
            if len(hidden):
                self.features[index].append(hidden.detach().float().cpu())
                self._count[index] += len(hidden)

        return hook

    def save_and_remove(self) -> Path:
        """Remove the hooks and write the collected features (atomically); returns the path."""
        from safetensors.torch import save

        for handle in self._handles:
            handle.remove()
        tensors = {f"layer_{i}": torch.cat(f).contiguous() for i, f in enumerate(self.features) if f}
        with atomic_write(self.path, "wb") as f:
            f.write(save(tensors))
        return self.path
