"""Gram matrices of the inputs of ``nn.Linear`` layers, collected by forward hooks.

RegMean (Jin et al., ICLR 2023, https://arxiv.org/abs/2212.09849) merges each linear layer from
``G = XᵀX / n`` of its inputs ``X`` (every token of every sample is a row). :class:`LinearInputGrams`
registers one forward hook per layer, adds ``XᵀX`` and the row count batch by batch (no running
mean: one division at the end), and removes its hooks on exit::

    with LinearInputGrams(linear_modules(model)) as grams:
        for pixel_values in batches:
            model(pixel_values)
    G = grams.grams()   # {module name: (in, in)}
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

__all__ = ["LinearInputGrams", "linear_modules", "reduce_off_diagonal"]


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def reduce_off_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """``gram`` with its off-diagonal entries multiplied by ``ratio`` (RegMean's α), the diagonal kept.

    Args:
        gram: ``(d, d)``.
        ratio: the factor of the off-diagonal entries (1: unchanged; 0: diagonal only).

    Returns:
        a new ``(d, d)`` tensor: ``ratio · G_ij`` off the diagonal, ``G_ii`` (exactly) on it.
    """
    reduced = gram * ratio  # (d, d)
    torch.diagonal(reduced).copy_(torch.diagonal(gram))
    return reduced


class LinearInputGrams:
    """Accumulate ``Σ XᵀX`` of each given linear layer's input while the block runs.

    Args:
        modules: ``{name: nn.Linear}`` to watch (e.g. :func:`linear_modules`).
        dtype: accumulation dtype (inputs are cast to it before the product).

    Attributes:
        sums: ``{name: Σ XᵀX}`` of shape ``(in, in)``, on the layer's device.
        rows: ``{name: number of rows of X seen}`` (tokens × samples).
    """

    def __init__(self, modules: Mapping[str, nn.Module], *, dtype: torch.dtype = torch.float32) -> None:
        self.modules = dict(modules)
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0].detach()  # (..., in)
            x = x.reshape(-1, x.shape[-1]).to(self.dtype)  # (n, in)
            xtx = x.T @ x  # (in, in)
            if name in self.sums:
                self.sums[name] += xtx
                self.rows[name] += x.shape[0]
            else:
                self.sums[name], self.rows[name] = xtx, x.shape[0]

        return hook

    def __enter__(self) -> "LinearInputGrams":
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def grams(self) -> dict[str, torch.Tensor]:
        """``{name: Σ XᵀX / rows}`` for every layer that saw input (the mean over tokens)."""
        return {name: total / self.rows[name] for name, total in self.sums.items()}
