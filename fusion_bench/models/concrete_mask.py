"""A Concrete (relaxed Bernoulli) mask over a model's parameters, one logit per entry.

Tang et al., *Concrete Subspace Learning based Interference Elimination for Multi-task Model
Fusion*, 2023. https://arxiv.org/abs/2312.06173

The mask of tensor ``k`` is drawn from ``RelaxedBernoulli(temperature, logits_k)``:
``m = sigmoid((logits + log u − log(1 − u)) / temperature)``, ``u ~ U(0, 1)``, differentiable in
the logits (the reparameterisation trick). Every draw takes an explicit generator, so a run is
reproducible from its seed. Masks are rescaled by their mean (``m / mean(m)``) before use, which
keeps the expected size of a masked task vector.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor

__all__ = [
    "MASK_KINDS",
    "init_mask_logits",
    "sample_concrete_mask",
    "sample_bernoulli_mask",
    "threshold_mask",
    "final_mask",
    "rescale_mask",
    "mask_density",
]

MASK_KINDS = ("continuous", "discrete", "threshold")


def init_mask_logits(
    shapes: Mapping[str, torch.Size], value: float, *, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """Mask logits ``{name: tensor filled with value}``, trainable leaves.

    Args:
        shapes: ``{name: shape}`` of the masked tensors.
        value: the initial logit (0: keep probability 0.5).
        device: where the logits live.
    """
    return {
        name: torch.full(tuple(shape), float(value), device=device, requires_grad=True)
        for name, shape in shapes.items()
    }


def _uniform(logits: Tensor, generator: torch.Generator) -> Tensor:
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    eps = torch.finfo(logits.dtype).eps
    return u.clamp(eps, 1 - eps)


def sample_concrete_mask(
    logits: Mapping[str, Tensor], temperature: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """One relaxed Bernoulli draw per entry (differentiable in ``logits``), values in (0, 1).

    Args:
        logits: ``{name: logits}``.
        temperature: the relaxation temperature (→ 0: Bernoulli).
        generator: the noise source (on the logits' device).
    """
    mask = {}
    for name, x in logits.items():
        u = _uniform(x, generator)
        mask[name] = torch.sigmoid((x + u.log() - (-u).log1p()) / temperature)
    return mask


@torch.no_grad()
def sample_bernoulli_mask(logits: Mapping[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """One hard 0/1 draw per entry, keep probability ``sigmoid(logits)``."""
    return {name: (_uniform(x, generator) < torch.sigmoid(x)).to(x.dtype) for name, x in logits.items()}


@torch.no_grad()
def threshold_mask(logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The deterministic mask: 1 where the keep probability is at least 0.5 (logit ≥ 0), else 0."""
    return {name: (x >= 0).to(x.dtype) for name, x in logits.items()}


@torch.no_grad()
def final_mask(
    logits: Mapping[str, Tensor], kind: str, *, temperature: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """The mask a trained run merges with: ``kind`` is one of :data:`MASK_KINDS`.

    ``continuous``: a relaxed draw (the reference's ``eval_mask_type``); ``discrete``: a hard
    Bernoulli draw; ``threshold``: :func:`threshold_mask`. Draws use ``generator`` (seeded).
    """
    if kind == "continuous":
        return {k: v.detach() for k, v in sample_concrete_mask(logits, temperature, generator).items()}
    if kind == "discrete":
        return sample_bernoulli_mask(logits, generator)
    if kind == "threshold":
        return threshold_mask(logits)
    raise ValueError(f"unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")


def rescale_mask(mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``m / mean(m)`` per tensor (an all-zero mask stays zero instead of becoming NaN)."""
    # an all-zero m divided by the clamped (tiny) mean stays zero; no device sync, no NaN gradient
    return {name: m / m.mean().clamp_min(torch.finfo(m.dtype).tiny) for name, m in mask.items()}


@torch.no_grad()
def mask_density(masks: Iterable[Tensor]) -> float:
    """The mean mask value over all entries (the fraction kept, for a 0/1 mask)."""
    total, count = 0.0, 0
    for m in masks:
        total += float(m.sum())
        count += m.numel()
    return total / max(count, 1)
