"""Task arithmetic: ``θ = θ0 + λ Σ_i (θ_i − θ0)``.

Ilharco et al., *Editing Models with Task Arithmetic*, ICLR 2023. https://arxiv.org/abs/2212.04089
Default ``λ = 0.3`` (the seeds' tables). Task vectors are summed in model-pool order.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from fusion_bench.merge import stream_merge
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool

__all__ = ["task_arithmetic_tensor", "task_arithmetic", "TaskArithmeticAlgorithm"]

StateDict = Mapping[str, torch.Tensor]


def task_arithmetic_tensor(base: torch.Tensor, finetuned: Sequence[torch.Tensor], *, scaling_factor: float) -> torch.Tensor:
    """``base + scaling_factor * Σ_i (finetuned_i − base)`` for one tensor.

    Two buffers (the sum and one difference) serve every model: the same operations, in the
    same order, as the plain expression, without a fresh temporary per model.
    """
    total, diff = torch.zeros_like(base), torch.empty_like(base)
    for theta in finetuned:
        total.add_(torch.sub(theta, base, out=diff))
    return total.mul_(scaling_factor).add_(base)


def task_arithmetic(base: StateDict, finetuned: Sequence[StateDict], *, scaling_factor: float) -> dict[str, torch.Tensor]:
    """Task arithmetic over whole state dicts (the pure core; the streamed merge gives the same tensors)."""
    return {k: task_arithmetic_tensor(base[k], [sd[k] for sd in finetuned], scaling_factor=scaling_factor) for k in base}


@register_algorithm("task_arithmetic")
class TaskArithmeticAlgorithm(BaseAlgorithm):
    """Args:
    scaling_factor: λ, the weight of the summed task vectors.
    """

    def __init__(self, scaling_factor: float = 0.3) -> None:
        self.scaling_factor = float(scaling_factor)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        return stream_merge(
            modelpool,
            lambda key, base, thetas: task_arithmetic_tensor(base, thetas, scaling_factor=self.scaling_factor),
            desc="task arithmetic",
        )
