"""Parameter counts for reports."""

from __future__ import annotations

from torch import nn

__all__ = ["count_parameters", "model_info"]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; shared parameters counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def model_info(model: nn.Module) -> dict[str, float | int]:
    """``{'trainable_params', 'all_params', 'trainable_percentage'}`` as in the reports."""
    trainable, total = count_parameters(model)
    return {
        "trainable_params": trainable,
        "all_params": total,
        "trainable_percentage": trainable / total if total else 0.0,
    }
