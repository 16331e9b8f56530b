"""The contract of every pure core: the in-memory twin of a streamed data-free merge.

A pure core takes whole state dicts and returns the merged one. :func:`pure_core` gives every
core the same contract, matching the streaming engine:

* its inputs are never modified: the core sees fresh tensors, upcast once to the compute dtype
  (float16/bfloat16 to float32; float32 and float64 kept) before any arithmetic;
* only floating tensors reach the merge; every other tensor (e.g. ``position_ids``) is copied
  into the result from θ0 (or, for cores without a base, from the first model).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor

from fusion_bench.merge.streaming import compute_dtype

__all__ = ["StateDict", "upcast_floats", "pure_core"]

StateDict = Mapping[str, Tensor]
Core = Callable[..., dict[str, Tensor]]


def upcast_floats(state_dict: StateDict) -> dict[str, Tensor]:
    """The floating tensors of ``state_dict`` as fresh tensors in their compute dtype (one copy each)."""
    return {k: v.to(compute_dtype(v.dtype), copy=True) for k, v in state_dict.items() if v.is_floating_point()}


def _with_non_floats(merged: dict[str, Tensor], reference: StateDict) -> dict[str, Tensor]:
    """``merged`` plus a copy of every non-floating tensor of ``reference``, in ``reference``'s key order."""
    return {k: (merged[k] if v.is_floating_point() else v.clone()) for k, v in reference.items()}


def pure_core(*, with_base: bool = True) -> Callable[[Core], Core]:
    """Decorate a core ``(base, finetuned, **options)`` (``with_base=False``: ``(state_dicts, *args, **options)``)
    so it keeps the contract of the module docstring."""

    def decorate(core: Core) -> Core:
        if with_base:

            @functools.wraps(core)
            def with_theta0(
                base: StateDict, finetuned: Sequence[StateDict], *args: Any, **options: Any
            ) -> dict[str, Tensor]:
                merged = core(upcast_floats(base), [upcast_floats(sd) for sd in finetuned], *args, **options)
                return _with_non_floats(merged, base)

            return with_theta0

        @functools.wraps(core)
        def without_theta0(state_dicts: Sequence[StateDict], *args: Any, **options: Any) -> dict[str, Tensor]:
            merged = core([upcast_floats(sd) for sd in state_dicts], *args, **options)
            return _with_non_floats(merged, state_dicts[0])

        return without_theta0

    return decorate
