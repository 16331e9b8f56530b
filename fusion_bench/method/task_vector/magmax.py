"""MagMax: per entry, the task vector of largest magnitude, scaled.

Marczak et al., *MagMax: Leveraging Model Merging for Seamless Continual Learning*, ECCV 2024.
https://arxiv.org/abs/2407.06322 (code: https://github.com/danielm1405/magmax)

Per tensor entry j: ``τ_max[j] = τ_{t*}[j]`` with ``t* = argmax_t |τ_t[j]|``; ``θ = θ0 + λ · τ_max``.
Ties go to the *later* task in pool order (the authors' ``merge_max_abs`` folds the tasks in order and
replaces the running choice when ``|τ_t| ≥`` it). Default ``scaling_factor`` = 0.5 (the authors'
eight-task script and the reference FusionBench ``config/method/magmax/magmax.yaml``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.merge.cores import pure_core
from fusion_bench.method._options import check_range
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.method.task_vector.core import family_core, family_merge, plan_pool
from fusion_bench.modelpool import BaseModelPool

__all__ = ["max_magnitude", "magmax", "MagMaxAlgorithm"]

NAME = "magmax"
StateDict = Mapping[str, Tensor]


def max_magnitude(key: str, tvs: list[Tensor]) -> Tensor:
    """The entry of largest ``|τ_t|`` over the tasks (ties: the later task)."""
    chosen = tvs[0].clone()
    for tv in tvs[1:]:
        chosen = torch.where(tv.abs() >= chosen.abs(), tv, chosen)
    return chosen


@pure_core()
def magmax(base: StateDict, finetuned: Sequence[StateDict], *, scaling_factor: float = 0.5) -> dict[str, Tensor]:
    """MagMax over whole state dicts (the pure core; the streamed merge gives the same tensors)."""
    return family_core(base, finetuned, aggregate=max_magnitude, scaling_factor=scaling_factor)


@register_algorithm(NAME, core=magmax)
class MagMaxAlgorithm(BaseAlgorithm):
    """Args:
    scaling_factor: λ, the weight of the max-magnitude task vector.
    """

    def __init__(self, scaling_factor: float = 0.5) -> None:
        self.scaling_factor = check_range(NAME, "scaling_factor", scaling_factor)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        return family_merge(
            modelpool, plan_pool(modelpool), aggregate=max_magnitude, scaling_factor=self.scaling_factor, desc=NAME
        )
