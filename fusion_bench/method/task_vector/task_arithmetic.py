"""Task arithmetic: ``θ = θ0 + λ Σ_i (θ_i − θ0)``, the task-vector family with a plain sum.

Ilharco et al., *Editing Models with Task Arithmetic*, ICLR 2023. https://arxiv.org/abs/2212.04089
Default ``λ = 0.3`` (the published tables' value; see docs/algorithms.md). Task vectors are summed
in model-pool order, through the family core (:mod:`fusion_bench.method.task_vector.core`).
"""

from __future__ import annotations

from functools import partial
from typing import Mapping, Sequence

import torch
from torch import nn

from fusion_bench.merge.cores import pure_core
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.method.task_vector.core import (
    family_core,
    family_merge,
    plan_pool,
    sum_aggregate,
    task_arithmetic_tensor,
)
from fusion_bench.modelpool import BaseModelPool

__all__ = [
    "task_arithmetic_tensor",
    "task_arithmetic",
    "task_arithmetic_merge",
    "frozen_task_arithmetic",
    "TaskArithmeticAlgorithm",
]

StateDict = Mapping[str, torch.Tensor]


@pure_core()
def task_arithmetic(
    base: StateDict, finetuned: Sequence[StateDict], *, scaling_factor: float = 0.3
) -> dict[str, torch.Tensor]:
    """Task arithmetic over whole state dicts (the pure core; the streamed merge gives the same tensors)."""
    return family_core(base, finetuned, aggregate=sum_aggregate, scaling_factor=scaling_factor)


#: Streamed ``θ0 + λ Σ_t f(τ_t)``: the family merge with task arithmetic's sum over the task vectors passed
#: through ``transform=f`` (DARE, breadcrumbs; none: plain task arithmetic). Called as
#: ``task_arithmetic_merge(modelpool, plan, scaling_factor=λ, transform=f, desc=label)``.
task_arithmetic_merge = partial(family_merge, aggregate=sum_aggregate)


def frozen_task_arithmetic(
    modelpool: BaseModelPool, names: Sequence[str], scaling_factor: float, *, desc: str
) -> nn.Module:
    """``θ0 + λ Σ_t τ_t`` over the pool's models ``names`` (streamed per tensor), every parameter frozen: the base
    over which the upscaling methods (WEMoE, RankOne-MoE, PWE-MoE) route their experts."""
    from fusion_bench.merge import stream_merge

    merged = stream_merge(
        modelpool,
        lambda key, base, thetas: task_arithmetic_tensor(base, thetas, scaling_factor=scaling_factor),
        model_names=list(names),
        desc=desc,
    )
    return merged.requires_grad_(False)


@register_algorithm("task_arithmetic", core=task_arithmetic)
class TaskArithmeticAlgorithm(BaseAlgorithm):
    """Args:
    scaling_factor: λ, the weight of the summed task vectors.
    """

    def __init__(self, scaling_factor: float = 0.3) -> None:
        self.scaling_factor = float(scaling_factor)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        return task_arithmetic_merge(
            modelpool, plan_pool(modelpool), scaling_factor=self.scaling_factor, desc="task arithmetic"
        )
