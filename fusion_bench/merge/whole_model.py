"""The task-vector family's core: whole-model statistics and the merge, streamed or in memory.

A family member is ``θ0 + λ · aggregate(key, [transform(t, key, τ_t)])`` per tensor, where
``transform`` sparsifies one task's tensor (DARE, breadcrumbs; identity for TIES) and
``aggregate`` combines the tasks (a sum, TIES' elect + disjoint merge, consensus, PCB).
Methods whose aggregate needs whole-model statistics (TIES' global magnitude threshold and
majority sign, PCB's quantiles) compute them first from a :class:`TaskVectors` view:

* :class:`PoolTaskVectors` streams them from a model pool, one tensor per model at a time;
* :class:`StateDictTaskVectors` reads them from state dicts in memory (the pure cores).

Both give the same tensors in the same order, so a streamed merge equals its in-memory core
bitwise. :func:`family_merge` and :func:`family_core` then apply the per-key formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench.errors import ModelPoolError
from fusion_bench.merge.streaming import check_finite, check_pool_compatible, compute_dtype, prefetched, stream_merge
from fusion_bench.merge.task_vectors import (
    MergeFunc,
    TiesStatistics,
    fill_flat,
    magnitude_threshold_,
    majority_sign,
    sign_balance,
    sum_in_order,
    ties_merge_tensor,
    trim_below_,
)
from fusion_bench.modelpool.base_pool import PRETRAINED, BaseModelPool
from fusion_bench.modelpool.lazy_tensors import TensorSource

__all__ = [
    "Aggregate",
    "TaskVectorTransform",
    "PoolPlan",
    "TaskVectors",
    "PoolTaskVectors",
    "StateDictTaskVectors",
    "plan_pool",
    "flat_task_vector",
    "ties_statistics",
    "sum_aggregate",
    "ties_aggregate",
    "family_merge",
    "family_core",
]

StateDict = Mapping[str, Tensor]
TaskVectorTransform = Callable[[int, str, Tensor], Tensor]  # (task index, key, τ) -> τ'
Aggregate = Callable[[str, list[Tensor]], Tensor]  # (key, [τ_t]) -> merged τ


@dataclass(frozen=True)
class PoolPlan:
    """What a whole-model pass over a validated pool visits.

    Attributes:
        names: the fine-tuned models, in pool order.
        keys: the floating tensors, in sorted order (the flattening order of the reference).
        numel: total entries over ``keys``.
        dtype: the compute dtype of a flat buffer (float64 if any tensor is, else float32).
    """

    names: tuple[str, ...]
    keys: tuple[str, ...]
    numel: int
    dtype: torch.dtype


def plan_pool(modelpool: BaseModelPool, *, min_models: int = 1) -> PoolPlan:
    """Validate the pool as :func:`stream_merge` does (before any whole-model pass) and plan it.

    Raises:
        ModelPoolError: too few fine-tuned models, or no ``_pretrained_`` model.
        IncompatibleModelsError: keys, shapes or dtypes differ between models.
    """
    names = list(modelpool.model_names)
    if len(names) < min_models:
        raise ModelPoolError(f"this method needs at least {min_models} fine-tuned model(s); the pool has {names}")
    if not modelpool.has_pretrained:
        raise ModelPoolError(f"this method needs a {PRETRAINED!r} model in the pool; models: {modelpool.all_model_names}")
    keys = check_pool_compatible(modelpool, [PRETRAINED, *names])
    source = modelpool.tensor_source(PRETRAINED)
    meta = {k: source.shape_dtype(k) for k in keys}
    float_keys = sorted(k for k in keys if meta[k][1].is_floating_point)
    return _plan(names, float_keys, {k: meta[k] for k in float_keys})


def _plan(names: Sequence[str], keys: Sequence[str], meta: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> PoolPlan:
    numel = sum(math.prod(meta[k][0]) for k in keys)
    wide = any(compute_dtype(meta[k][1]) == torch.float64 for k in keys)
    return PoolPlan(tuple(names), tuple(keys), numel, torch.float64 if wide else torch.float32)


class TaskVectors(Protocol):
    """Task vectors of ``plan.names`` over ``plan.keys``, read one tensor at a time."""

    plan: PoolPlan

    def task(self, index: int) -> Iterator[tuple[str, Tensor]]:
        """Yield ``(key, τ_index[key])`` over ``plan.keys``."""
        ...

    def by_key(self) -> Iterator[tuple[str, list[Tensor]]]:
        """Yield ``(key, [τ_0[key], ..., τ_{T-1}[key]])`` over ``plan.keys``."""
        ...


class PoolTaskVectors:
    """Task vectors streamed from a pool (upcast to the compute dtype, transform applied).

    Args:
        modelpool: a pool validated by :func:`plan_pool`.
        plan: its plan.
        transform: applied to every ``τ_t[key]`` (e.g. a DARE drop), or None.
    """

    def __init__(self, modelpool: BaseModelPool, plan: PoolPlan, transform: TaskVectorTransform | None = None) -> None:
        self.modelpool, self.plan, self.transform = modelpool, plan, transform
        self._checked: set[tuple[str, str]] = set()  # (model, key) pairs already proven finite

    def task(self, index: int) -> Iterator[tuple[str, Tensor]]:
        base, source = self.modelpool.tensor_source(PRETRAINED), self.modelpool.tensor_source(self.plan.names[index])
        name = self.plan.names[index]

        def read(key: str) -> tuple[Tensor, Tensor]:  # in the reader thread, overlapping the caller's work
            return self._checked_get(name, source, key), self._checked_get(PRETRAINED, base, key)

        for key, (theta, b) in prefetched(read, self.plan.keys):
            yield key, self._task_vector(index, key, theta, b)

    def by_key(self) -> Iterator[tuple[str, list[Tensor]]]:
        base = self.modelpool.tensor_source(PRETRAINED)
        sources = [self.modelpool.tensor_source(n) for n in self.plan.names]

        def read(key: str) -> tuple[Tensor, list[Tensor]]:  # in the reader thread, overlapping the caller's work
            thetas = [self._checked_get(n, s, key) for n, s in zip(self.plan.names, sources)]
            return self._checked_get(PRETRAINED, base, key), thetas

        for key, (b, thetas) in prefetched(read, self.plan.keys):
            yield key, [self._task_vector(i, key, theta, b) for i, theta in enumerate(thetas)]

    def _task_vector(self, index: int, key: str, theta: Tensor, base: Tensor) -> Tensor:
        dtype = compute_dtype(theta.dtype)
        tv = theta.to(dtype) - base.to(dtype)
        return tv if self.transform is None else self.transform(index, key, tv)

    def _checked_get(self, name: str, source: TensorSource, key: str) -> Tensor:
        """``source.get(key)``, NaN/Inf-checked once per (model, key) over all passes."""
        tensor = source.get(key)
        if (name, key) not in self._checked:
            check_finite(name, key, tensor)
            self._checked.add((name, key))
        return tensor


class StateDictTaskVectors:
    """Task vectors of in-memory state dicts (the pure cores' counterpart of :class:`PoolTaskVectors`).

    Args:
        base: θ0's state dict.
        finetuned: the fine-tuned state dicts, in pool order.
        transform: as for :class:`PoolTaskVectors`.
    """

    def __init__(self, base: StateDict, finetuned: Sequence[StateDict], transform: TaskVectorTransform | None = None) -> None:
        keys = sorted(k for k, v in base.items() if v.is_floating_point())
        meta = {k: (tuple(base[k].shape), base[k].dtype) for k in keys}
        self.plan = _plan([str(i) for i in range(len(finetuned))], keys, meta)
        self.base, self.finetuned, self.transform = base, list(finetuned), transform

    def task(self, index: int) -> Iterator[tuple[str, Tensor]]:
        for key in self.plan.keys:
            yield key, self._task_vector(index, key)

    def by_key(self) -> Iterator[tuple[str, list[Tensor]]]:
        for key in self.plan.keys:
            yield key, [self._task_vector(i, key) for i in range(len(self.finetuned))]

    def _task_vector(self, index: int, key: str) -> Tensor:
        dtype = compute_dtype(self.base[key].dtype)
        tv = self.finetuned[index][key].to(dtype) - self.base[key].to(dtype)
        return tv if self.transform is None else self.transform(index, key, tv)


# ---- whole-model statistics -----------------------------------------------------------------


def flat_task_vector(vectors: TaskVectors, index: int, *, magnitude: bool = False) -> Tensor:
    """Task ``index`` flattened over the sorted keys into one ``(numel,)`` buffer.

    Only this buffer is held (one model's worth of entries), never a second task.
    """
    return fill_flat((tv for _, tv in vectors.task(index)), vectors.plan.numel, vectors.plan.dtype, magnitude=magnitude)


def ties_statistics(vectors: TaskVectors, density: float) -> TiesStatistics:
    """TIES' whole-model statistics (ALGORITHMS.md).

    Pass 1, one task at a time: ``|τ_t|`` flattened over the whole model, threshold = the
    ``k``-th smallest with ``k = d − int(d·density)``. Pass 2, key by key: the elected signs
    of the trimmed vectors, summed exactly over the whole model into the majority sign.

    Args:
        vectors: the task vectors (streamed or in memory).
        density: fraction kept per task, in ``(0, 1]`` (``threshold / 100``).

    Returns:
        the per-task thresholds and the majority sign.
    """
    thresholds = []
    for index in tqdm(range(len(vectors.plan.names)), desc="TIES thresholds", leave=False, disable=None):
        thresholds.append(magnitude_threshold_(flat_task_vector(vectors, index, magnitude=True), density))
    balance = 0
    for _, tvs in vectors.by_key():
        trimmed = [trim_below_(tv, thr) for tv, thr in zip(tvs, thresholds)]  # the task vectors are fresh tensors
        balance += sign_balance(torch.sign(sum_in_order(trimmed)))
    return TiesStatistics(tuple(thresholds), majority_sign(balance))


# ---- the merge ----------------------------------------------------------------------------


def sum_aggregate(key: str, tvs: list[Tensor]) -> Tensor:
    """Task arithmetic's aggregate: ``Σ_t τ_t`` in pool order."""
    return sum_in_order(tvs)


def ties_aggregate(stats: TiesStatistics, merge_func: MergeFunc) -> Aggregate:
    """TIES' aggregate (trim, elect, disjoint merge) given its whole-model statistics."""
    return lambda key, tvs: ties_merge_tensor(tvs, stats, merge_func)


def _merged(base: Tensor, thetas: Sequence[Tensor], key: str, *, aggregate: Aggregate, scaling_factor: float,
            transform: TaskVectorTransform | None) -> Tensor:  # fmt: skip
    tvs = [theta - base for theta in thetas]
    if transform is not None:
        tvs = [transform(i, key, tv) for i, tv in enumerate(tvs)]
    return base + scaling_factor * aggregate(key, tvs)


def family_merge(modelpool: BaseModelPool, plan: PoolPlan, *, aggregate: Aggregate, scaling_factor: float,
                 transform: TaskVectorTransform | None = None, desc: str = "merging") -> nn.Module:  # fmt: skip
    """Stream ``θ0 + λ · aggregate(key, [transform(t, key, τ_t)])`` over the pool.

    Args:
        modelpool: the pool (validated by :func:`plan_pool`).
        plan: its plan (the models merged, in pool order).
        aggregate: combines one key's task vectors.
        scaling_factor: λ.
        transform: per-task sparsification, or None.
        desc: progress bar label.

    Returns:
        the merged model.
    """
    return stream_merge(
        modelpool,
        lambda key, base, thetas: _merged(base, thetas, key, aggregate=aggregate, scaling_factor=scaling_factor,
                                          transform=transform),
        model_names=plan.names,
        desc=desc,
    )  # fmt: skip


def family_core(base: StateDict, finetuned: Sequence[StateDict], *, aggregate: Aggregate, scaling_factor: float,
                transform: TaskVectorTransform | None = None) -> dict[str, Tensor]:  # fmt: skip
    """The in-memory twin of :func:`family_merge` (non-floating tensors are copied from θ0).

    Returns:
        the merged state dict (floating tensors in the compute dtype).
    """
    merged = {}
    for key, b in base.items():
        if not b.is_floating_point():
            merged[key] = b.clone()
            continue
        dtype = compute_dtype(b.dtype)
        thetas = [sd[key].to(dtype) for sd in finetuned]
        merged[key] = _merged(b.to(dtype), thetas, key, aggregate=aggregate, scaling_factor=scaling_factor,
                              transform=transform)  # fmt: skip
    return merged
