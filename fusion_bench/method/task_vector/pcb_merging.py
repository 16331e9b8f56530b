"""PCB-Merging: parameter competition balancing (intra- and inter-task), drop and rescale.

Du et al., *Parameter Competition Balancing for Model Merging*, NeurIPS 2024.
https://arxiv.org/abs/2410.02396 (code: https://github.com/duguodong7/pcb-merging)

As the authors' ``pcb-merging.py`` (``PCB_merge``), over each task vector flattened over the
whole model (d entries):

1. clamp ``|τ_t|`` to ``[lo_t, hi_t]``, the order statistics at ``int(d·min_ratio)`` and
   ``int(d·(1 − max_ratio) − 1)`` of the sorted ``|τ_t|``; ``c_t = sign(τ_t) · clamped``;
2. intra-balancing ``exp(T · ((clamped − lo_t) / (hi_t − lo_t))²)``;
3. inter-balancing ``tanh(τ_t · Σ_s τ_s)``;
4. score = intra · inter; drop: scores below the order statistic at ``int(d·(1 − pcb_ratio))``
   of task t's scores get weight 0, the others ``(score − q_t) / (max_t − q_t)``;
5. rescale: ``merged = Σ_t w_t c_t / max(Σ_t w_t, 1e-12)``; ``θ = θ0 + λ · merged``.

Defaults: ``min_ratio`` = ``max_ratio`` = 0.0001 (``pcb-merging.py``); ``pcb_ratio`` = 0.05 and
``scaling_factor`` = 1.2, the values the authors' ViT scripts run with (``lams = [1.2]*n``,
``pcb_ratio = 0.05``; the function's own default ratio is 0.1). Their evolutionary search of
per-task λ on validation data is not included. Where the reference divides 0 by 0 (a task
whose clamped magnitudes or scores are all equal) we use weight 0 instead of NaN.

Streaming: pass A, per task, holds one flat ``|τ_t|`` to get ``lo_t, hi_t`` and accumulates
``Σ_s τ_s`` (one model's worth); pass B, per task, holds one flat score vector to get ``q_t`` and
``max_t``; then the merge runs key by key. Peak memory: about two models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench.merge.tensors import fill_flat, order_statistics_, sum_in_order
from fusion_bench.method.task_vector.core import (
    Aggregate,
    PoolTaskVectors,
    StateDictTaskVectors,
    TaskVectors,
    family_core,
    family_merge,
    plan_pool,
)
from fusion_bench.method._options import check_range
from fusion_bench.merge.cores import pure_core
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool

__all__ = ["PCBStatistics", "pcb_statistics", "pcb_merge_tensor", "pcb_merging", "PCBMergingAlgorithm"]

StateDict = Mapping[str, Tensor]
NAME = "pcb_merging"


@dataclass(frozen=True)
class PCBStatistics:
    """Per-task whole-model statistics (0-d tensors): clamp bounds and score floor/top."""

    lo: tuple[Tensor, ...]
    hi: tuple[Tensor, ...]
    floor: tuple[Tensor, ...]
    top: tuple[Tensor, ...]


def _unit(x: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """``(x − low) / (high − low)``; 0 where ``high == low``."""
    span = high - low
    return (x - low) / span if bool(span > 0) else torch.zeros_like(x)


def pcb_score(tv: Tensor, tv_sum: Tensor, lo: Tensor, hi: Tensor, num_tasks: int) -> Tensor:
    """One task's balancing score: ``exp(T · unit(clamp(|τ|))²) · tanh(τ · Σ_s τ_s)`` (τ's shape)."""
    intra = torch.exp(num_tasks * _unit(tv.abs().clamp(lo, hi), lo, hi) ** 2)
    return intra * torch.tanh(tv * tv_sum)


def pcb_merge_tensor(tvs: Sequence[Tensor], stats: PCBStatistics) -> Tensor:
    """PCB on one tensor given the whole-model statistics: ``Σ w_t c_t / max(Σ w_t, 1e-12)``."""
    tv_sum = sum_in_order(tvs)
    numerator, denominator = torch.zeros_like(tv_sum), torch.zeros_like(tv_sum)
    for t, tv in enumerate(tvs):
        score = pcb_score(tv, tv_sum, stats.lo[t], stats.hi[t], len(tvs))
        weight = _unit(score.clamp(min=stats.floor[t]), stats.floor[t], stats.top[t])
        numerator += torch.sign(tv) * tv.abs().clamp(stats.lo[t], stats.hi[t]) * weight
        denominator += weight
    return numerator / denominator.clamp(min=1e-12)


def _clamp_bounds_(flat_abs: Tensor, min_ratio: float, max_ratio: float) -> tuple[Tensor, Tensor]:
    """The reference's ``sorted[int(d·min_ratio)]`` and ``sorted[int(d·(1 − max_ratio) − 1)]`` (reorders the buffer)."""
    d = flat_abs.numel()
    low_index, high_index = int(d * min_ratio), max(int(d * (1 - max_ratio) - 1), 0)
    low, high = order_statistics_(flat_abs, [low_index + 1, high_index + 1])
    return low, high


def _magnitudes_accumulating(vectors: TaskVectors, t: int, tv_sum: dict[str, Tensor]) -> Iterator[Tensor]:
    """Yield ``|τ_t[key]|`` key by key while adding ``τ_t[key]`` into ``tv_sum`` (pool order)."""
    for key, tv in vectors.task(t):
        tv_sum.setdefault(key, torch.zeros_like(tv)).add_(tv)
        yield tv.abs()


def pcb_statistics(vectors: TaskVectors, *, pcb_ratio: float, min_ratio: float, max_ratio: float) -> PCBStatistics:
    """PCB's whole-model statistics, one task's flat vector at a time (see the module docstring).

    Args:
        vectors: the task vectors (streamed or in memory).
        pcb_ratio: fraction of each task's entries with a non-zero weight, in (0, 1].
        min_ratio, max_ratio: fractions clamped at the bottom / top of each ``|τ_t|``.

    Returns:
        the per-task clamp bounds and score floor/top.
    """
    plan, num_tasks = vectors.plan, len(vectors.plan.names)
    lo, hi, tv_sum = [], [], {}  # tv_sum: Σ_s τ_s, one model's worth
    for t in tqdm(range(num_tasks), desc="PCB clamp bounds", leave=False, disable=None):
        flat_abs = fill_flat(_magnitudes_accumulating(vectors, t, tv_sum), plan.numel, plan.dtype)  # (d,)
        bounds = _clamp_bounds_(flat_abs, min_ratio, max_ratio)
        lo.append(bounds[0])
        hi.append(bounds[1])
    floor, top = [], []
    for t in tqdm(range(num_tasks), desc="PCB score quantiles", leave=False, disable=None):
        scores = (pcb_score(tv, tv_sum[key], lo[t], hi[t], num_tasks) for key, tv in vectors.task(t))
        flat = fill_flat(scores, plan.numel, plan.dtype)  # (d,)
        top.append(flat.max())
        floor.append(order_statistics_(flat, [int(plan.numel * (1 - pcb_ratio)) + 1])[0])
    return PCBStatistics(tuple(lo), tuple(hi), tuple(floor), tuple(top))


def pcb_aggregate(stats: PCBStatistics) -> Aggregate:
    """PCB's aggregate for the family merge."""
    return lambda key, tvs: pcb_merge_tensor(tvs, stats)


@pure_core()
def pcb_merging(
    base: StateDict,
    finetuned: Sequence[StateDict],
    *,
    scaling_factor: float = 1.2,
    pcb_ratio: float = 0.05,
    min_ratio: float = 0.0001,
    max_ratio: float = 0.0001,
) -> dict[str, Tensor]:
    """PCB-Merging over whole state dicts (the pure core; the streamed algorithm gives the same tensors).

    Args:
        base: θ0.
        finetuned: θ_1..θ_T in pool order.
        scaling_factor: λ.
        pcb_ratio: fraction of each task's entries kept (non-zero weight).
        min_ratio, max_ratio: clamp fractions of ``|τ_t|``.

    Returns:
        the merged state dict.
    """
    stats = pcb_statistics(
        StateDictTaskVectors(base, finetuned), pcb_ratio=pcb_ratio, min_ratio=min_ratio, max_ratio=max_ratio
    )
    return family_core(base, finetuned, aggregate=pcb_aggregate(stats), scaling_factor=scaling_factor)


@register_algorithm("pcb_merging", core=pcb_merging)
class PCBMergingAlgorithm(BaseAlgorithm):
    """PCB-Merging, streamed (see the module docstring).

    Args:
        scaling_factor: λ applied to the balanced average of the task vectors.
        pcb_ratio: fraction of each task's entries kept by balancing score, in (0, 1].
        min_ratio: fraction of each ``|τ_t|`` clamped up to its low order statistic, in [0, 0.5).
        max_ratio: fraction of each ``|τ_t|`` clamped down to its high order statistic, in [0, 0.5).
    """

    def __init__(
        self, scaling_factor: float = 1.2, pcb_ratio: float = 0.05, min_ratio: float = 0.0001, max_ratio: float = 0.0001
    ) -> None:
        self.scaling_factor = check_range(NAME, "scaling_factor", scaling_factor)
        self.pcb_ratio = check_range(
            NAME,
            "pcb_ratio",
            pcb_ratio,
            low=0,
            high=1,
            low_open=True,
            hint=" (fraction of each task vector kept by balancing score)",
        )
        self.min_ratio = check_range(NAME, "min_ratio", min_ratio, low=0, high=0.5, high_open=True)
        self.max_ratio = check_range(NAME, "max_ratio", max_ratio, low=0, high=0.5, high_open=True)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        plan = plan_pool(modelpool)
        stats = pcb_statistics(
            PoolTaskVectors(modelpool, plan),
            pcb_ratio=self.pcb_ratio,
            min_ratio=self.min_ratio,
            max_ratio=self.max_ratio,
        )
        return family_merge(
            modelpool, plan, aggregate=pcb_aggregate(stats), scaling_factor=self.scaling_factor, desc="PCB merging"
        )
