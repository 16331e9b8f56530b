"""TIES-Merging: trim, elect sign, disjoint merge; ``θ = θ0 + λ · merged``.

Yadav et al., *TIES-Merging: Resolving Interference When Merging Models*, NeurIPS 2023.
https://arxiv.org/abs/2306.01708

Reference defaults (the FusionBench configs behind the published tables; see docs/algorithms.md):
``scaling_factor`` λ = 0.3, ``threshold`` = 20 (percent of entries kept by magnitude),
``merge_func`` = ``sum``. The paper aggregates with the disjoint **mean** (``merge_func: mean``:
the agreeing entries divided by their count); ``sum`` is what the reference code runs by
default and what reproduces the published FusionBench numbers. ``max`` is also offered.

Whole-model trimming, as the reference: each τ_t is flattened over the whole model (floating
tensors, keys in sorted order) and keeps ``|v| ≥`` the k-th smallest ``|v|`` with
``k = d − int(d · threshold / 100)`` (the top 20 %, plus ties); elected sign ``γ = sign(Σ_t
trimmed τ_t)``, zeros take the sign of Σγ over the whole model. ``threshold`` is always a
percent here (the reference reads values ≤ 1 as fractions).

Everything TIES-only is in this module: the trimming, the sign election, the disjoint merge,
the whole-model statistics and the algorithm. Streaming (through
:mod:`fusion_bench.method.task_vector.core`): pass 1 computes each task's threshold
holding one task's flattened ``|τ|`` at a time (an in-place selection on a float32 buffer);
pass 2 merges key by key and sums the elected signs on the way (:class:`TiesMergePass`).

The majority sign is known only at the end of pass 2, but it matters only where a key's
trimmed sum is exactly 0. Pass 2 merges with a provisional majority (``+1``) and keeps, for
those entries whose result could change (a trimmed sum cancelling to 0 with entries left, or
θ0 = ±0 where the sign of a zero could flip), their index, θ0 and trimmed values; when the
whole-model majority turns out different, only those entries are merged again, with the same
operations, so the result has the same bits as the three-pass order (elect, then merge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench.merge.tensors import fill_flat, order_statistics_, sum_in_order
from fusion_bench.method._options import check_choice, check_range
from fusion_bench.merge.cores import pure_core
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.merge.streaming import stream_merge
from fusion_bench.method.task_vector.core import (
    Aggregate,
    PoolPlan,
    PoolTaskVectors,
    StateDictTaskVectors,
    TaskVectors,
    TaskVectorTransform,
    plan_pool,
)
from fusion_bench.modelpool import BaseModelPool

__all__ = [
    "MERGE_FUNCS",
    "MergeFunc",
    "TiesStatistics",
    "magnitude_threshold",
    "magnitude_threshold_",
    "trim_below",
    "trim_below_",
    "trim_top_k",
    "sign_balance",
    "majority_sign",
    "ties_elect_sign",
    "disjoint_merge",
    "ties_merge_tensor",
    "flat_task_vector",
    "ties_statistics",
    "ties_aggregate",
    "TiesMergePass",
    "task_thresholds",
    "ties_single_pass_core",
    "ties_stream_merge",
    "check_ties_options",
    "ties_merging",
    "TiesMergingAlgorithm",
]

StateDict = Mapping[str, torch.Tensor]


MergeFunc = Literal["sum", "mean", "max"]
MERGE_FUNCS: tuple[str, ...] = ("sum", "mean", "max")


@dataclass(frozen=True)
class TiesStatistics:
    """The whole-model statistics TIES needs before it can merge one tensor.

    Attributes:
        thresholds: per task, keep entries with ``|τ| ≥ thresholds[t]`` (0-d tensors).
        majority: ``sign(Σγ)`` over the whole model, the sign given to entries whose elected
            sign is 0 (``-1.0``, ``0.0`` or ``1.0``).
    """

    thresholds: tuple[Tensor, ...]
    majority: float


# ---- trimming ----------------------------------------------------------------------------


def magnitude_threshold(abs_flat: Tensor, density: float) -> Tensor:
    """TIES' magnitude threshold over one flat vector of magnitudes.

    ``k = d − int(d · density)``; entries with ``|v| ≥`` the ``k``-th smallest ``|v|`` are
    kept: the top ``density`` fraction, plus every entry tied with the threshold.

    Args:
        abs_flat: ``(d,)`` magnitudes.
        density: the fraction kept, in ``(0, 1]``.

    Returns:
        a 0-d threshold (0 when ``k = 0``: everything is kept).
    """
    return magnitude_threshold_(abs_flat.clone(), density)


def magnitude_threshold_(abs_flat: Tensor, density: float) -> Tensor:
    """:func:`magnitude_threshold` that reorders ``abs_flat`` in place (no copy of a whole-model buffer)."""
    k = abs_flat.numel() - int(abs_flat.numel() * density)
    if k <= 0:
        return torch.zeros((), dtype=abs_flat.dtype)
    return order_statistics_(abs_flat, [k])[0]


def trim_below(tv: Tensor, threshold: Tensor | float) -> Tensor:
    """``tv`` with every entry of magnitude below ``threshold`` set to 0 (same shape)."""
    return torch.where(tv.abs() >= threshold, tv, 0.0)


def trim_below_(tv: Tensor, threshold: Tensor | float) -> Tensor:
    """:func:`trim_below` in place (``tv`` is overwritten and returned)."""
    return tv.masked_fill_(tv.abs() < threshold, 0.0)


def trim_top_k(tv: Tensor, density: float) -> Tensor:
    """Per-tensor TIES trimming: keep the top ``density`` fraction of ``tv`` by magnitude.

    Args:
        tv: a task vector tensor, any shape.
        density: fraction kept, in ``(0, 1]`` (TIES' ``threshold`` / 100).

    Returns:
        the trimmed tensor (ties at the threshold are kept).
    """
    return trim_below(tv, magnitude_threshold_(tv.abs().flatten(), density))


# ---- TIES sign election and disjoint merge ---------------------------------------------------


def sign_balance(sign: Tensor) -> int:
    """``#(sign > 0) − #(sign < 0)``: the exact sum of a tensor of signs."""
    return int((sign > 0).sum()) - int((sign < 0).sum())


def majority_sign(balance: int) -> float:
    """``sign(balance)`` as a float (``-1.0``, ``0.0`` or ``1.0``)."""
    return float((balance > 0) - (balance < 0))


def ties_elect_sign(tvs: Sequence[Tensor], majority: float | None = None) -> Tensor:
    """TIES' elected sign ``γ = sign(Σ_t τ_t)``; zeros take the majority sign.

    Args:
        tvs: the (trimmed) task vectors of one tensor, ``T`` tensors of one shape.
        majority: the sign zeros take; by default ``sign(Σγ)`` over this tensor. Whole-model
            TIES passes the sign of ``Σγ`` over the whole model (see docs/algorithms.md).

    Returns:
        ``γ``, a float tensor of ``-1, 0, 1`` (0 only where the majority is 0 too).
    """
    sign = torch.sign(sum_in_order(tvs))
    if majority is None:
        majority = majority_sign(sign_balance(sign))
    return torch.where(sign == 0, torch.tensor(majority, dtype=sign.dtype, device=sign.device), sign)


def disjoint_merge(tvs: Sequence[Tensor], sign: Tensor, mode: MergeFunc = "sum") -> Tensor:
    """Aggregate the entries of ``tvs`` that agree with ``sign``.

    An entry agrees when it is ``> 0`` where ``sign > 0``, else ``< 0`` (as the reference
    ``torch.where(sign > 0, v > 0, v < 0)``).

    Args:
        tvs: ``T`` tensors of one shape.
        sign: the elected sign, same shape.
        mode: ``"sum"`` (the reference default), ``"mean"`` (the paper's disjoint mean:
            divided by the number of agreeing entries, at least 1) or ``"max"`` (largest
            agreeing magnitude times the sign).

    Returns:
        the merged task vector of this tensor.
    """
    # agree <=> tv · direction > 0, with direction = +1 where sign > 0 and -1 elsewhere; the agreeing
    # entries of one position share one sign, so summing their magnitudes and restoring the sign at the
    # end gives the signed sum bit for bit, with one product and one clamp per task (no masks).
    direction = torch.where(sign > 0, 1.0, -1.0).to(sign.dtype)
    total = torch.zeros_like(sign)
    count = torch.zeros_like(sign) if mode == "mean" else None
    peak = torch.zeros_like(sign) if mode == "max" else None
    magnitude = torch.empty_like(sign)
    for tv in tvs:
        torch.mul(tv, direction, out=magnitude).clamp_(min=0.0)  # |tv| where it agrees, else 0
        total += magnitude
        if count is not None:
            count += magnitude > 0
        if peak is not None:
            torch.maximum(peak, magnitude, out=peak)
    if mode == "sum":
        return total.mul_(direction)
    if mode == "mean":
        return total.mul_(direction).div_(count.clamp_(min=1))
    return peak.mul_(sign)


def ties_merge_tensor(tvs: Sequence[Tensor], stats: TiesStatistics, merge_func: MergeFunc = "sum") -> Tensor:
    """TIES on one tensor: trim each task by its whole-model threshold, elect, merge.

    Args:
        tvs: ``T`` task vector tensors of one key.
        stats: the whole-model thresholds and majority sign.
        merge_func: see :func:`disjoint_merge`.

    Returns:
        the merged task vector (not yet scaled).
    """
    trimmed = [trim_below(tv, thr) for tv, thr in zip(tvs, stats.thresholds)]  # tvs stay untouched
    return disjoint_merge(trimmed, ties_elect_sign(trimmed, stats.majority), merge_func)


# ---- whole-model statistics and the aggregate -----------------------------------------------------------------


def flat_task_vector(vectors: TaskVectors, index: int, *, magnitude: bool = False) -> Tensor:
    """Task ``index`` flattened over the sorted keys into one ``(numel,)`` buffer.

    Only this buffer is held (one model's worth of entries), never a second task.
    """
    return fill_flat((tv for _, tv in vectors.task(index)), vectors.plan.numel, vectors.plan.dtype, magnitude=magnitude)


def ties_statistics(vectors: TaskVectors, density: float) -> TiesStatistics:
    """TIES' whole-model statistics (docs/algorithms.md).

    Pass 1, one task at a time: ``|τ_t|`` flattened over the whole model, threshold = the
    ``k``-th smallest with ``k = d − int(d·density)``. Pass 2, key by key: the elected signs
    of the trimmed vectors, summed exactly over the whole model into the majority sign.

    Args:
        vectors: the task vectors (streamed or in memory).
        density: fraction kept per task, in ``(0, 1]`` (``threshold / 100``).

    Returns:
        the per-task thresholds and the majority sign.
    """
    thresholds = task_thresholds(vectors, density)
    balance = 0
    for _, tvs in vectors.by_key():
        trimmed = [trim_below_(tv, thr) for tv, thr in zip(tvs, thresholds)]  # the task vectors are fresh tensors
        balance += sign_balance(torch.sign(sum_in_order(trimmed)))
    return TiesStatistics(tuple(thresholds), majority_sign(balance))


def ties_aggregate(stats: TiesStatistics, merge_func: MergeFunc) -> Aggregate:
    """TIES' aggregate (trim, elect, disjoint merge) given its whole-model statistics."""
    return lambda key, tvs: ties_merge_tensor(tvs, stats, merge_func)


# ---- one pass: merge and elect together ----------------------------------------------------------


PROVISIONAL_MAJORITY = 1.0  # the majority sign pass 2 merges with before the whole-model one is known


@dataclass(frozen=True)
class _Pending:
    """Entries of one key whose merged value depends on the whole-model majority sign."""

    key: str
    index: Tensor  # flat positions in the key's tensor
    base: Tensor  # θ0 there (compute dtype)
    trimmed: Tensor  # (T, n): the trimmed task vectors there


class TiesMergePass:
    """TIES' per-key merge (``(key, θ0, [θ_t]) -> θ``) that also elects the whole-model majority sign.

    Each call trims ``τ_t = θ_t − θ0`` by the task thresholds, elects ``sign(Σ_t trimmed)``, merges
    with :data:`PROVISIONAL_MAJORITY` where that sum is 0, adds the key's sign balance, and keeps the
    entries the true majority could change (see the module docstring). :meth:`finish` then
    rewrites those entries in the merged tensors once the majority is known.

    Args:
        thresholds: per task, keep ``|τ| ≥ thresholds[t]``.
        merge_func: see :func:`disjoint_merge`.
        scaling_factor: λ.
        transform: applied to every ``τ_t[key]`` before trimming (e.g. a DARE drop), or None.
    """

    def __init__(
        self,
        thresholds: Sequence[Tensor],
        merge_func: MergeFunc,
        scaling_factor: float,
        transform: TaskVectorTransform | None = None,
    ) -> None:
        self.thresholds, self.merge_func, self.scaling_factor = tuple(thresholds), merge_func, scaling_factor
        self.transform = transform
        self.balance = 0
        self.pending: list[_Pending] = []

    def __call__(self, key: str, base: Tensor, thetas: Sequence[Tensor]) -> Tensor:
        tvs = [theta - base for theta in thetas]
        if self.transform is not None:
            tvs = [self.transform(i, key, tv) for i, tv in enumerate(tvs)]
        trimmed = [trim_below_(tv, thr) for tv, thr in zip(tvs, self.thresholds)]  # fresh tensors, trimmed in place
        sign = torch.sign(sum_in_order(trimmed))
        self.balance += sign_balance(sign)
        zero = sign == 0
        elected = torch.where(zero, torch.tensor(PROVISIONAL_MAJORITY, dtype=sign.dtype, device=sign.device), sign)
        merged = disjoint_merge(trimmed, elected, self.merge_func)
        if bool(zero.any()):
            # with a +1 majority an entry whose trimmed values cancel merges to > 0, one with none left to 0;
            # the latter's result θ0 + λ·(±0) equals θ0 unless θ0 is ±0
            changeable = (zero & ((merged != 0) | (base == 0))).flatten().nonzero().squeeze(1)
            if changeable.numel():
                rows = torch.stack([t.flatten()[changeable] for t in trimmed])
                self.pending.append(_Pending(key, changeable, base.flatten()[changeable], rows))
        return base + self.scaling_factor * merged

    @property
    def majority(self) -> float:
        """``sign(Σγ)`` over every key merged so far."""
        return majority_sign(self.balance)

    def finish(self, merged: Mapping[str, Tensor]) -> None:
        """Rewrite, in ``merged`` (key -> the merged tensor, any dtype), the entries the majority changes."""
        majority = self.majority
        if majority == PROVISIONAL_MAJORITY:
            return
        for item in self.pending:
            target = merged[item.key]
            sign = torch.full_like(item.base, majority)
            values = item.base + self.scaling_factor * disjoint_merge(list(item.trimmed), sign, self.merge_func)
            target.view(-1)[item.index] = values.to(target.dtype)
        self.pending.clear()


def task_thresholds(vectors: TaskVectors, density: float) -> tuple[Tensor, ...]:
    """Pass 1: per task, the magnitude threshold over its whole flattened ``|τ_t|`` (one task held at a time)."""
    return tuple(
        magnitude_threshold_(flat_task_vector(vectors, index, magnitude=True), density)
        for index in tqdm(range(len(vectors.plan.names)), desc="TIES thresholds", leave=False, disable=None)
    )


def ties_single_pass_core(
    base: StateDict,
    finetuned: Sequence[StateDict],
    *,
    density: float,
    merge_func: MergeFunc,
    scaling_factor: float,
    transform: TaskVectorTransform | None = None,
) -> dict[str, Tensor]:
    """TIES over in-memory state dicts in two passes (thresholds, then :class:`TiesMergePass`)."""
    thresholds = task_thresholds(StateDictTaskVectors(base, finetuned, transform), density)
    merge = TiesMergePass(thresholds, merge_func, scaling_factor, transform)
    merged = {key: merge(key, b, [sd[key] for sd in finetuned]) for key, b in base.items()}
    merge.finish(merged)
    return merged


def ties_stream_merge(
    modelpool: BaseModelPool,
    plan: PoolPlan,
    *,
    density: float,
    merge_func: MergeFunc,
    scaling_factor: float,
    transform: TaskVectorTransform | None = None,
    desc: str = "TIES",
) -> nn.Module:
    """TIES streamed over the pool in two passes (thresholds, then :class:`TiesMergePass`)."""
    thresholds = task_thresholds(PoolTaskVectors(modelpool, plan, transform), density)
    merge = TiesMergePass(thresholds, merge_func, scaling_factor, transform)
    model = stream_merge(modelpool, merge, model_names=plan.names, desc=desc, validated_keys=plan.all_keys)
    merge.finish(modelpool.canonical_state_dict(model))
    return model


# ---- the algorithm -------------------------------------------------------------------------


def check_ties_options(method: str, threshold: float, merge_func: str) -> tuple[float, MergeFunc]:
    """Validate TIES' ``threshold`` (percent in (0, 100]) and ``merge_func``; return the density."""
    percent = check_range(
        method,
        "threshold",
        threshold,
        low=0,
        high=100,
        low_open=True,
        hint=" (percent of each task vector's entries kept by magnitude)",
    )
    return percent / 100.0, check_choice(method, "merge_func", merge_func, MERGE_FUNCS)  # type: ignore[return-value]


@pure_core()
def ties_merging(
    base: StateDict,
    finetuned: Sequence[StateDict],
    *,
    scaling_factor: float = 0.3,
    threshold: float = 20,
    merge_func: MergeFunc = "sum",
) -> dict[str, torch.Tensor]:
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
    return ties_single_pass_core(base, finetuned, density=density, merge_func=merge_func, scaling_factor=scaling_factor)


@register_algorithm("ties_merging", core=ties_merging)
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
        return ties_stream_merge(
            modelpool,
            plan,
            density=self._density,
            merge_func=self.merge_func,  # type: ignore[arg-type]
            scaling_factor=self.scaling_factor,
        )
