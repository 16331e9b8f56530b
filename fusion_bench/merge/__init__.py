"""Tensor math shared by the data-free methods, and the streaming engine that applies it."""

from fusion_bench.merge.streaming import (
    PerKeyMerge,
    check_finite,
    check_pool_compatible,
    compute_dtype,
    stream_merge,
    stream_task_vectors,
)

__all__ = ["PerKeyMerge", "check_finite", "check_pool_compatible", "compute_dtype", "stream_merge", "stream_task_vectors"]
