"""The streaming engine of data-free merges.

A merge is a function of one key's tensors: ``merged = f(key, base, [θ_1, ..., θ_T])``.
:func:`stream_merge` validates the pool (same keys, shapes and dtypes in every model, no
NaN/Inf), loads one model as the output buffer, and then, key by key, reads that key's
tensor from each model (one tensor per model at a time, from safetensors) and writes the
result into the buffer in place. Peak memory is about one model plus one tensor per model,
whatever the number of models. Methods that need a whole-model statistic (TIES' global
magnitude threshold) compute it first with :func:`stream_task_vectors`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from fusion_bench.errors import IncompatibleModelsError, ModelPoolError
from fusion_bench.modelpool.base_pool import PRETRAINED, BaseModelPool
from fusion_bench.utils.progress import progress

__all__ = [
    "PerKeyMerge",
    "validate_pool",
    "check_pool_compatible",
    "check_finite",
    "prefetched",
    "stream_merge",
    "stream_task_vectors",
    "compute_dtype",
]

T = TypeVar("T")
PerKeyMerge = Callable[[str, "torch.Tensor | None", list[torch.Tensor]], torch.Tensor]


def _shown(keys: Sequence[str]) -> str:
    return f"{list(keys[:3])}{'...' if len(keys) > 3 else ''}"


def check_same_tensor_names(keys_by_model: dict[str, Sequence[str]]) -> None:
    """Raise naming the model whose tensor names differ from the others' (the most common set of
    names is the expected one): its unexpected tensors, or those it lacks.

    Raises:
        IncompatibleModelsError: one line, naming the model and up to three tensors.
    """
    sets = {name: frozenset(keys) for name, keys in keys_by_model.items()}
    counts: dict[frozenset, int] = {}
    for keys in sets.values():
        counts[keys] = counts.get(keys, 0) + 1
    expected = max(counts, key=lambda k: (counts[k], k == next(iter(sets.values()))))
    for name, keys in sets.items():
        if keys == expected:
            continue
        unexpected, lacking = sorted(keys - expected), sorted(expected - keys)
        others = "the other models" if counts[expected] > 1 else repr(next(n for n, k in sets.items() if k == expected))
        parts = ([f"has unexpected tensor(s) {_shown(unexpected)} that {others} lack"] if unexpected else []) + (
            [f"lacks tensor(s) {_shown(lacking)} that {others} have"] if lacking else []
        )
        raise IncompatibleModelsError(f"model {name!r} {' and '.join(parts)}")


def check_pool_compatible(modelpool: BaseModelPool, names: Sequence[str]) -> list[str]:
    """Check every model has the same keys, shapes and dtypes as the first; return the keys.

    Raises:
        IncompatibleModelsError: naming the model and tensor, expected vs got.
    """
    ref_name = names[0]
    ref_source = modelpool.tensor_source(ref_name)
    ref_keys = ref_source.keys()
    ref_meta = {k: ref_source.shape_dtype(k) for k in ref_keys}
    check_same_tensor_names(
        {name: list(modelpool.tensor_source(name).keys()) for name in progress(names, desc="opening models")}
    )
    for name in names[1:]:
        source = modelpool.tensor_source(name)
        for key in ref_keys:
            got = source.shape_dtype(key)
            if got != ref_meta[key]:
                raise IncompatibleModelsError(
                    f"model {name!r}, tensor {key!r}: shape/dtype {tuple(got[0])}/{got[1]} "
                    f"differs from model {ref_name!r}: {tuple(ref_meta[key][0])}/{ref_meta[key][1]}"
                )
    return list(ref_keys)


def check_finite(name: str, key: str, tensor: torch.Tensor) -> None:
    """Raise :class:`IncompatibleModelsError` if a floating tensor holds NaN or Inf.

    A NaN or Inf makes the sum non-finite, so a finite sum (one cheap reduction) proves the
    tensor clean; only a non-finite sum (NaN/Inf, or an overflow) takes the exact check.
    """
    if not tensor.is_floating_point() or torch.isfinite(tensor.sum()):
        return
    if not torch.isfinite(tensor).all():
        bad = "NaN" if torch.isnan(tensor).any() else "Inf"
        raise IncompatibleModelsError(f"model {name!r}, tensor {key!r} contains {bad}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges compute in at least float32 (half precision inputs are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def validate_pool(
    modelpool: BaseModelPool, model_names: Sequence[str] | None = None, *, min_models: int = 1, with_base: bool = True
) -> tuple[list[str], list[str]]:
    """Check a pool before a merge reads any tensor; return the fine-tuned names and the keys.

    Args:
        modelpool: the pool.
        model_names: the fine-tuned models to merge (default: all, in pool order).
        min_models: fewest fine-tuned models the method accepts.
        with_base: the merge needs ``_pretrained_``.

    Returns:
        ``(names, keys)``: the models merged, in pool order, and every tensor name of the pool
        (in the order of the buffer model: ``_pretrained_``, else the first fine-tuned model).

    Raises:
        ModelPoolError: too few fine-tuned models, or no ``_pretrained_`` model.
        IncompatibleModelsError: keys, shapes or dtypes differ between models.
    """
    names = list(model_names) if model_names is not None else modelpool.model_names
    if len(names) < min_models:
        raise ModelPoolError(f"this method needs at least {min_models} fine-tuned model(s); the pool has {names}")
    if with_base and not modelpool.has_pretrained:
        raise ModelPoolError(
            f"this method needs a {PRETRAINED!r} model in the pool; models: {modelpool.all_model_names}"
        )
    buffer_name = PRETRAINED if with_base else names[0]
    return names, check_pool_compatible(modelpool, [buffer_name, *[n for n in names if n != buffer_name]])


def stream_merge(
    modelpool: BaseModelPool,
    merge: PerKeyMerge,
    *,
    with_base: bool = True,
    model_names: Sequence[str] | None = None,
    min_models: int = 1,
    desc: str = "merging",
    validated_keys: Sequence[str] | None = None,
) -> nn.Module:
    """Merge the pool key by key into one model (see module docstring).

    Args:
        modelpool: the pool; ``_pretrained_`` is the base (and the output buffer) when
            ``with_base``, else the first fine-tuned model is the buffer and ``base`` is None.
        merge: ``(key, base, [θ_i]) -> merged`` over floating tensors upcast to at least
            float32; the result is cast back to the checkpoint's dtype. Non-floating tensors
            must be equal in every model and are kept.
        model_names: the fine-tuned models to merge (default: all, in pool order).
        min_models: fewest fine-tuned models the method accepts.
        desc: progress bar label.
        validated_keys: the keys :func:`validate_pool` returned for this pool and these models,
            when the caller has validated it already (it is then not checked a second time).

    Returns:
        the merged model (the buffer model, modified in place).
    """
    if validated_keys is None:
        names, keys = validate_pool(modelpool, model_names, min_models=min_models, with_base=with_base)
    else:
        names, keys = list(model_names) if model_names is not None else modelpool.model_names, list(validated_keys)
    buffer_name = PRETRAINED if with_base else names[0]
    model = modelpool.load_model(buffer_name)
    own = modelpool.canonical_state_dict(model)

    def read(key: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        # runs in the reader thread: reading and checking the next key overlap the merge of this one
        base = modelpool.get_tensor(PRETRAINED, key) if with_base else None
        tensors = [modelpool.get_tensor(n, key) for n in names]
        for n, t in zip(names, tensors):
            check_finite(n, key, t)
        if base is not None:
            check_finite(PRETRAINED, key, base)
        return base, tensors

    for key, (base, tensors) in tqdm(prefetched(read, keys), total=len(keys), desc=desc, leave=False, disable=None):
        target = own[key]
        if not target.is_floating_point():
            _check_equal_non_float(key, names, tensors, target)
            continue
        dtype = compute_dtype(target.dtype)
        merged = merge(key, None if base is None else base.to(dtype), [t.to(dtype) for t in tensors])
        if tuple(merged.shape) != tuple(target.shape):
            raise RuntimeError(f"merge of {key!r} returned shape {tuple(merged.shape)}, expected {tuple(target.shape)}")
        target.copy_(merged.to(target.dtype))
    return model


def prefetched(read: Callable[[str], T], keys: Sequence[str]) -> Iterator[tuple[str, T]]:
    """Yield ``(key, read(key))`` while a background thread already reads the next key:
    file reads (which release the GIL) overlap the merge arithmetic."""
    if not keys:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusion_bench-read") as pool:
        pending = pool.submit(read, keys[0])
        for i, key in enumerate(keys):
            value = pending.result()
            if i + 1 < len(keys):
                pending = pool.submit(read, keys[i + 1])
            yield key, value


def _check_equal_non_float(
    key: str, names: Sequence[str], tensors: Sequence[torch.Tensor], target: torch.Tensor
) -> None:
    for n, t in zip(names, tensors):
        if not torch.equal(t, target):
            raise IncompatibleModelsError(
                f"model {n!r}, non-float tensor {key!r} differs from the base; cannot merge it"
            )


def stream_task_vectors(
    modelpool: BaseModelPool, name: str, keys: Sequence[str] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, θ_name[key] - θ_0[key])`` for floating tensors, one key at a time (float32+)."""
    source, base = modelpool.tensor_source(name), modelpool.tensor_source(PRETRAINED)
    for key in keys if keys is not None else source.keys():
        t = source.get(key)
        if t.is_floating_point():
            dtype = compute_dtype(t.dtype)
            yield key, t.to(dtype) - base.get(key).to(dtype)
