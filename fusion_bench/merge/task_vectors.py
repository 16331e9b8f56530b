"""Pure tensor functions of the task-vector family (no I/O, no model pool).

Task arithmetic, TIES, DARE, Model Breadcrumbs, TALL/consensus masks and PCB are all
"task vectors -> sparsify -> elect/aggregate -> scale -> add to θ0". This module holds
the shared pieces, each a small function of tensors; :mod:`fusion_bench.merge.whole_model`
applies them to a model pool (streamed) or to state dicts (in memory), and each method
module is a named parametrisation of that core.

Notation: ``τ_t = θ_t − θ0`` (one tensor of one task), ``T`` tasks, shapes in comments.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import torch
from torch import Tensor

__all__ = [
    "MERGE_FUNCS",
    "MergeFunc",
    "TiesStatistics",
    "sum_in_order",
    "fill_flat",
    "kth_smallest",
    "order_statistics_",
    "magnitude_threshold",
    "magnitude_threshold_",
    "trim_below",
    "trim_below_",
    "trim_top_k",
    "dare_generator",
    "dare_drop",
    "breadcrumbs_mask",
    "sign_balance",
    "majority_sign",
    "ties_elect_sign",
    "disjoint_merge",
    "ties_merge_tensor",
    "tall_mask",
    "consensus_mask",
]

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


# ---- sums and order statistics -------------------------------------------------------------


def sum_in_order(tensors: Sequence[Tensor]) -> Tensor:
    """``Σ tensors`` accumulated from zeros in the given (model-pool) order.

    Args:
        tensors: at least one tensor, all of one shape and dtype.

    Returns:
        the sum; the same order of additions everywhere makes streamed and in-memory merges
        bitwise equal.
    """
    total = torch.zeros_like(tensors[0])
    for t in tensors:
        total += t
    return total


def fill_flat(chunks: Iterable[Tensor], numel: int, dtype: torch.dtype, *, magnitude: bool = False) -> Tensor:
    """Copy ``chunks`` (or their magnitudes) one after another into one preallocated 1-D buffer.

    Args:
        chunks: tensors of any shapes, ``numel`` entries in all.
        numel: the total number of entries.
        dtype: the buffer's dtype.
        magnitude: write ``|chunk|`` (computed straight into the buffer, no temporary).

    Returns:
        the ``(numel,)`` buffer. Only the buffer is held, never a list of the chunks.
    """
    buffer = torch.empty(numel, dtype=dtype)
    offset = 0
    for chunk in chunks:
        n = chunk.numel()
        if offset + n > numel:
            raise RuntimeError(f"fill_flat: chunks hold more than the {numel} entries announced")
        view = buffer[offset : offset + n].view(chunk.shape)
        if magnitude and chunk.dtype == dtype:
            torch.abs(chunk, out=view)
        else:
            view.copy_(chunk.abs() if magnitude else chunk)
        offset += n
    if offset != numel:
        raise RuntimeError(f"fill_flat: chunks hold {offset} entries, {numel} announced")
    return buffer


def kth_smallest(flat: Tensor, k: int) -> Tensor:
    """The ``k``-th smallest entry (1-based) of a 1-D tensor, as a 0-d tensor (``flat`` is kept)."""
    return flat.kthvalue(k).values


def order_statistics_(flat: Tensor, ks: Sequence[int]) -> list[Tensor]:
    """The ``k``-th smallest entries (1-based) of a 1-D tensor, reordering ``flat`` in place.

    Same values as ``torch.kthvalue``; on CPU an in-place selection (``numpy.partition``)
    needs no copy of the buffer and no int64 index tensor (``kthvalue`` needs about 3x the
    buffer's memory), and is about 3x faster on a ViT-B/32-sized vector.

    Args:
        flat: a ``(d,)`` buffer the caller no longer needs in its order.
        ks: ranks in ``[1, d]``.

    Returns:
        one 0-d tensor per rank, of ``flat``'s dtype.
    """
    if flat.device.type != "cpu" or flat.dtype not in (torch.float32, torch.float64):
        return [kth_smallest(flat, k) for k in ks]
    flat = flat if flat.is_contiguous() else flat.contiguous()
    array = flat.detach().numpy()  # shares memory with flat
    array.partition(sorted({k - 1 for k in ks}))
    return [flat[k - 1].clone() for k in ks]


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


# ---- DARE --------------------------------------------------------------------------------


def dare_generator(seed: int, task_index: int, key: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, task_index, key)`` by a stable hash.

    Every (task, tensor) pair gets its own stream, so a drop mask does not depend on the order
    in which tensors are visited (streamed passes and in-memory cores draw the same masks).
    """
    digest = hashlib.blake2b(f"{seed}\0{task_index}\0{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def dare_drop(tv: Tensor, p: float, generator: torch.Generator, *, rescale: bool = True) -> Tensor:
    """DARE: keep each entry with probability ``1 − p`` and rescale by ``1 / (1 − p)``.

    Yu et al., *Language Models are Super Mario*, 2023. https://arxiv.org/abs/2311.03099

    Args:
        tv: a task vector tensor, any shape.
        p: the drop rate, in ``[0, 1)``.
        generator: the CPU generator the ``U[0, 1)`` draws come from (float32, one per entry).
        rescale: divide the kept entries by ``1 − p`` (DARE's default).

    Returns:
        ``tv ⊙ m / (1 − p)`` with ``m = [u ≥ p]``; bitwise deterministic given the generator.
    """
    u = torch.rand(tv.shape, generator=generator, dtype=torch.float32)  # same shape as tv
    dropped = torch.where((u >= p).to(tv.device), tv, 0.0)
    return dropped / (1.0 - p) if rescale else dropped


# ---- Model Breadcrumbs -------------------------------------------------------------------------


def breadcrumbs_mask(tv: Tensor, beta: float, gamma: float) -> Tensor:
    """Model Breadcrumbs' mask of one tensor: drop the outliers and the small perturbations.

    Davari & Belilovsky, *Model Breadcrumbs*, 2023. https://arxiv.org/abs/2312.06795
    With ``s_j`` the ``j``-th largest magnitude of the ``n`` entries, ``n_top = int(n·gamma)``
    and ``n_keep = int(n·beta)``: keep ``s_{n_top + n_keep} ≤ |v| < s_{n_top}`` (no upper bound
    when ``n_top = 0``). Without ties this drops the ``n_top`` largest entries and keeps the next
    ``n_keep``, as the authors' code (rezazzr/breadcrumbs, ``TaskVectorMiddleKeep``, with
    ``torch.topk``); ties at a bound follow it (all dropped at the top, all kept at the bottom).

    Args:
        tv: a task vector tensor, any shape.
        beta: fraction of the entries kept, in ``(0, 1]``.
        gamma: fraction of the largest entries dropped as outliers, in ``[0, 1)``.

    Returns:
        a boolean mask of ``tv``'s shape.
    """
    magnitude = tv.abs()
    n = magnitude.numel()
    n_top, n_keep = int(n * gamma), min(int(n * beta), n - int(n * gamma))
    if n_keep <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    ranks = [n - n_top - n_keep + 1] + ([n - n_top + 1] if n_top > 0 else [])  # k-th smallest of s_j: k = n - j + 1
    bounds = order_statistics_(magnitude.flatten().clone(), ranks)
    mask = magnitude >= bounds[0]
    return mask & (magnitude < bounds[1]) if n_top > 0 else mask


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
            TIES passes the sign of ``Σγ`` over the whole model (see ALGORITHMS.md).

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


# ---- TALL masks and consensus -----------------------------------------------------------------


def tall_mask(tv: Tensor, tv_mtl: Tensor, lam: float) -> Tensor:
    """TALL mask of one task: ``|τ_t| ≥ λ_t · |τ_MTL − τ_t|`` (same shape, boolean).

    Wang et al., *Localizing Task Information for Improved Model Merging and Compression*,
    ICML 2024. https://arxiv.org/abs/2405.07813
    """
    return tv.abs() >= lam * (tv_mtl - tv).abs()


def consensus_mask(masks: Sequence[Tensor], k: int) -> Tensor:
    """Keep the weights selected by at least ``k`` of the task masks (boolean, same shape)."""
    count = torch.zeros(masks[0].shape, dtype=torch.int64, device=masks[0].device)
    for m in masks:
        count += m
    return count >= k
