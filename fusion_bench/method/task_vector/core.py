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

from fusion_bench.merge.streaming import check_finite, compute_dtype, prefetched, stream_merge, validate_pool
from fusion_bench.merge.tensors import sum_in_order
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
    "sum_aggregate",
    "task_arithmetic_tensor",
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
        all_keys: every tensor of the (validated) pool, in its own order: what
            :func:`~fusion_bench.merge.stream_merge` visits without validating the pool again.
    """

    names: tuple[str, ...]
    keys: tuple[str, ...]
    numel: int
    dtype: torch.dtype
    all_keys: tuple[str, ...]


def plan_pool(modelpool: BaseModelPool, *, min_models: int = 1) -> PoolPlan:
    """Validate the pool (once, with :func:`~fusion_bench.merge.validate_pool`) and plan it.

    Raises:
        ModelPoolError: too few fine-tuned models, or no ``_pretrained_`` model.
        IncompatibleModelsError: keys, shapes or dtypes differ between models.
    """
    names, keys = validate_pool(modelpool, min_models=min_models)
    source = modelpool.tensor_source(PRETRAINED)
    meta = {k: source.shape_dtype(k) for k in keys}
    float_keys = sorted(k for k in keys if meta[k][1].is_floating_point)
    return _plan(names, float_keys, {k: meta[k] for k in float_keys}, keys)


def _plan(
    names: Sequence[str],
    keys: Sequence[str],
    meta: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    all_keys: Sequence[str],
) -> PoolPlan:
    numel = sum(math.prod(meta[k][0]) for k in keys)
    wide = any(compute_dtype(meta[k][1]) == torch.float64 for k in keys)
    return PoolPlan(tuple(names), tuple(keys), numel, torch.float64 if wide else torch.float32, tuple(all_keys))


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

    def __init__(
        self, base: StateDict, finetuned: Sequence[StateDict], transform: TaskVectorTransform | None = None
    ) -> None:
        keys = sorted(k for k, v in base.items() if v.is_floating_point())
        meta = {k: (tuple(base[k].shape), base[k].dtype) for k in keys}
        self.plan = _plan([str(i) for i in range(len(finetuned))], keys, meta, list(base))
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


# ---- the merge ----------------------------------------------------------------------------


def sum_aggregate(key: str, tvs: list[Tensor]) -> Tensor:
    """Task arithmetic's aggregate: ``Σ_t τ_t`` in pool order."""
    return sum_in_order(tvs)


def task_arithmetic_tensor(base: Tensor, finetuned: Sequence[Tensor], *, scaling_factor: float) -> Tensor:
    """``base + scaling_factor * Σ_i (finetuned_i − base)`` for one tensor: the family's formula with
    :func:`sum_aggregate` and no transform.

    Two buffers (the sum and one difference) serve every model: the same operations, in the
    same order, as the general formula (bitwise the same result), without a fresh task vector
    per model. ``finetuned`` and ``base`` are not modified.
    """
    total, diff = torch.zeros_like(base), torch.empty_like(base)
    for theta in finetuned:
        total.add_(torch.sub(theta, base, out=diff))
    return total.mul_(scaling_factor).add_(base)


def _merged(
    base: Tensor,
    thetas: Sequence[Tensor],
    key: str,
    *,
    aggregate: Aggregate,
    scaling_factor: float,
    transform: TaskVectorTransform | None,
) -> Tensor:
    if aggregate is sum_aggregate and transform is None:  # task arithmetic: the same values, two buffers
        return task_arithmetic_tensor(base, thetas, scaling_factor=scaling_factor)
    tvs = [theta - base for theta in thetas]
    if transform is not None:
        tvs = [transform(i, key, tv) for i, tv in enumerate(tvs)]
    return base + scaling_factor * aggregate(key, tvs)


def family_merge(
    modelpool: BaseModelPool,
    plan: PoolPlan,
    *,
    aggregate: Aggregate,
    scaling_factor: float,
    transform: TaskVectorTransform | None = None,
    desc: str = "merging",
) -> nn.Module:
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
        lambda key, base, thetas: _merged(
            base, thetas, key, aggregate=aggregate, scaling_factor=scaling_factor, transform=transform
        ),
        model_names=plan.names,
        desc=desc,
        validated_keys=plan.all_keys,
    )


def family_core(
    base: StateDict,
    finetuned: Sequence[StateDict],
    *,
    aggregate: Aggregate,
    scaling_factor: float,
    transform: TaskVectorTransform | None = None,
) -> dict[str, Tensor]:
    """The in-memory twin of :func:`family_merge`, for cores decorated with
    :func:`~fusion_bench.merge.cores.pure_core` (floating tensors, already in the compute dtype).

    Returns:
        the merged floating tensors.
    """
    merged = {}
    for key, b in base.items():
        thetas = [sd[key] for sd in finetuned]
        merged[key] = _merged(b, thetas, key, aggregate=aggregate, scaling_factor=scaling_factor, transform=transform)
    return merged
