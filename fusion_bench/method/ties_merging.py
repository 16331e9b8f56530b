"""TIES-Merging: trim, elect sign, disjoint merge; ``θ = θ0 + λ · merged``.

Yadav et al., *TIES-Merging: Resolving Interference When Merging Models*, NeurIPS 2023.
https://arxiv.org/abs/2306.01708

Reference defaults (the FusionBench configs that produced the seeds' tables, ALGORITHMS.md):
``scaling_factor`` λ = 0.3, ``threshold`` = 20 (percent of entries kept by magnitude),
``merge_func`` = ``sum``. The paper aggregates with the disjoint **mean** (``merge_func: mean``:
the agreeing entries divided by their count); ``sum`` is what the reference code runs by
default and what reproduces the published FusionBench numbers. ``max`` is also offered.

Whole-model trimming, as the reference: each τ_t is flattened over the whole model (floating
tensors, keys in sorted order) and keeps ``|v| ≥`` the k-th smallest ``|v|`` with
``k = d − int(d · threshold / 100)`` (the top 20 %, plus ties); elected sign ``γ = sign(Σ_t
trimmed τ_t)``, zeros take the sign of Σγ over the whole model. ``threshold`` is always a
percent here (the reference reads values ≤ 1 as fractions).

Streaming (:mod:`fusion_bench.merge.whole_model`): pass 1 computes each task's threshold
holding one task's flattened ``|τ|`` at a time (``torch.kthvalue`` on a float32 buffer);
pass 2 sums the elected signs key by key; pass 3 merges key by key.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from fusion_bench.merge.task_vectors import MERGE_FUNCS, MergeFunc
from fusion_bench.merge.whole_model import (
    PoolTaskVectors,
    StateDictTaskVectors,
    family_core,
    family_merge,
    plan_pool,
    ties_aggregate,
    ties_statistics,
)
from fusion_bench.method._options import check_choice, check_range
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool

__all__ = ["ties_merging", "TiesMergingAlgorithm"]

StateDict = Mapping[str, torch.Tensor]


def check_ties_options(method: str, threshold: float, merge_func: str) -> tuple[float, MergeFunc]:
    """Validate TIES' ``threshold`` (percent in (0, 100]) and ``merge_func``; return the density."""
    percent = check_range(method, "threshold", threshold, low=0, high=100, low_open=True,
                          hint=" (percent of each task vector's entries kept by magnitude)")  # fmt: skip
    return percent / 100.0, check_choice(method, "merge_func", merge_func, MERGE_FUNCS)  # type: ignore[return-value]


def ties_merging(base: StateDict, finetuned: Sequence[StateDict], *, scaling_factor: float = 0.3,
                 threshold: float = 20, merge_func: MergeFunc = "sum") -> dict[str, torch.Tensor]:  # fmt: skip
    """TIES over whole state dicts (the pure core; the streamed algorithm gives the same tensors).

    Args:
        base: θ0.
        finetuned: θ_1..θ_T in pool order.
        scaling_factor: λ.
        threshold: percent of each task vector kept by magnitude, whole-model.
        merge_func: ``sum`` (reference), ``mean`` (paper) or ``max``.

    Returns:
        the merged state dict.
    """
    density, merge_func = check_ties_options("ties_merging", threshold, merge_func)
    stats = ties_statistics(StateDictTaskVectors(base, finetuned), density)
    return family_core(base, finetuned, aggregate=ties_aggregate(stats, merge_func), scaling_factor=scaling_factor)


@register_algorithm("ties_merging")
class TiesMergingAlgorithm(BaseAlgorithm):
    """TIES-Merging, streamed (see the module docstring).

    Args:
        scaling_factor: λ, the weight of the merged task vector.
        threshold: percent of each task vector's entries kept by magnitude, in (0, 100].
        merge_func: ``sum`` (reference default), ``mean`` (paper) or ``max``.
    """

    def __init__(self, scaling_factor: float = 0.3, threshold: float = 20, merge_func: str = "sum") -> None:
        self.scaling_factor = check_range("ties_merging", "scaling_factor", scaling_factor)
        self._density, self.merge_func = check_ties_options("ties_merging", threshold, merge_func)
        self.threshold = float(threshold)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        plan = plan_pool(modelpool)
        stats = ties_statistics(PoolTaskVectors(modelpool, plan), self._density)
        aggregate = ties_aggregate(stats, self.merge_func)  # type: ignore[arg-type]
        return family_merge(modelpool, plan, aggregate=aggregate, scaling_factor=self.scaling_factor, desc="TIES")
