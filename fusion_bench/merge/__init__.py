"""The streaming engine of data-free merges and the generic tensor helpers they share (``tensors``)."""

from fusion_bench.merge.streaming import (
    PerKeyMerge,
    check_finite,
    check_pool_compatible,
    compute_dtype,
    stream_merge,
    stream_task_vectors,
    validate_pool,
)

__all__ = [
    "PerKeyMerge",
    "check_finite",
    "check_pool_compatible",
    "compute_dtype",
    "stream_merge",
    "stream_task_vectors",
    "validate_pool",
]
