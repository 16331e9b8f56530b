"""The multi-task vector ``τ_MTL`` that consensus merging and LiNeS build on: task arithmetic or TIES.

One chooser for both methods. The option accepts either spelling of each choice: ``ta`` /
``task_arithmetic`` (``τ_MTL = Σ_t τ_t``) and ``ties`` / ``ties_merging`` (TIES' trimmed,
sign-elected disjoint merge, with its whole-model statistics computed here).
"""

from __future__ import annotations

from fusion_bench.method._options import check_choice
from fusion_bench.method.task_vector.core import Aggregate, TaskVectors, sum_aggregate
from fusion_bench.method.task_vector.ties_merging import MergeFunc, ties_aggregate, ties_statistics

__all__ = ["INNER_STEPS", "check_inner_step", "inner_aggregate"]

INNER_STEPS: dict[str, str] = {  # spelling -> canonical name
    "task_arithmetic": "task_arithmetic",
    "ties_merging": "ties_merging",
    "ta": "task_arithmetic",
    "ties": "ties_merging",
}


def check_inner_step(method: str, option: str, value: object) -> str:
    """The canonical inner step (``task_arithmetic`` or ``ties_merging``) of either spelling, else a ConfigError."""
    return INNER_STEPS[check_choice(method, option, value, tuple(INNER_STEPS))]


def inner_aggregate(vectors: TaskVectors, inner: str, *, density: float, merge_func: MergeFunc) -> Aggregate:
    """The per-key aggregate giving ``τ_MTL`` (``inner``: a canonical name from :func:`check_inner_step`).

    Args:
        vectors: the task vectors (TIES reads its whole-model statistics from them).
        inner: ``task_arithmetic`` or ``ties_merging``.
        density: TIES: the fraction of each task vector kept (``threshold / 100``).
        merge_func: TIES: the disjoint aggregation.
    """
    if inner == "task_arithmetic":
        return sum_aggregate
    return ties_aggregate(ties_statistics(vectors, density), merge_func)
