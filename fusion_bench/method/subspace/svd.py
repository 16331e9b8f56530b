"""Pure SVD tools shared by the subspace merges (TSV-M, Iso-C, Iso-CTS).

Every function takes and returns tensors (no model pool, no I/O), computes in the dtype it is
given (the streaming engine hands float32, or float64 for float64 checkpoints) and is
deterministic on CPU. Shapes in comments: a task-vector matrix is ``(m, n)``, ``r = min(m, n)``.

The reconstructions used here (``U diag(S) Vᵀ``, the polar factor ``P Qᵀ`` and the projector
``U Uᵀ``) do not depend on the sign or rotation freedom of singular vectors, so their values are
the same as any other SVD's (numpy's, the reference's) up to rounding, as long as truncation does
not split a repeated singular value.

Used by :mod:`fusion_bench.method.subspace.task_singular_vectors` (https://arxiv.org/abs/2412.00081) and
:mod:`fusion_bench.method.subspace.iso_merging` (https://arxiv.org/abs/2502.04959).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from fusion_bench.merge.tensors import sum_in_order

__all__ = [
    "thin_svd",
    "truncated_svd",
    "compose",
    "polar_factor",
    "isotropic_spectrum",
    "project_onto",
    "project_out",
    "mean_in_order",
    "matrix_or_mean",
    "subspace_merge_tensor",
]

SVD = tuple[Tensor, Tensor, Tensor]


def thin_svd(matrix: Tensor) -> SVD:
    """The thin SVD ``matrix = U diag(S) Vh``, singular values in descending order.

    Args:
        matrix: ``(m, n)``.

    Returns:
        ``U (m, r)``, ``S (r,)``, ``Vh (r, n)`` with ``r = min(m, n)``.
    """
    return torch.linalg.svd(matrix, full_matrices=False)


def truncated_svd(matrix: Tensor, k: int) -> SVD:
    """The ``k`` leading singular triplets of ``matrix``.

    Args:
        matrix: ``(m, n)``.
        k: number of components kept, ``0 <= k <= min(m, n)``.

    Returns:
        ``U (m, k)``, ``S (k,)``, ``Vh (k, n)``.
    """
    u, s, vh = thin_svd(matrix)
    return u[:, :k], s[:k], vh[:k, :]


def compose(u: Tensor, s: Tensor, vh: Tensor) -> Tensor:
    """``U diag(S) Vh`` without building the diagonal matrix.

    Args:
        u: ``(m, k)``.
        s: ``(k,)``.
        vh: ``(k, n)``.

    Returns:
        ``(m, n)``.
    """
    return (u * s) @ vh  # (m, k) * (k,) -> (m, k); @ (k, n) -> (m, n)


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthogonal factor ``P Qᵀ`` of the polar decomposition, from the SVD ``P Σ Qᵀ``.

    It is the (semi-)orthogonal matrix nearest to ``matrix`` in Frobenius norm: for a tall
    ``(m, k)`` input (``k <= m``) its columns are orthonormal, for a wide one its rows are.

    Args:
        matrix: ``(m, k)``.

    Returns:
        ``(m, k)``.
    """
    p, _, qh = thin_svd(matrix)
    return p @ qh  # (m, r) @ (r, k) -> (m, k)


def isotropic_spectrum(s: Tensor) -> Tensor:
    """Every singular value replaced by their mean (Iso-C's flat spectrum).

    Args:
        s: ``(r,)``.

    Returns:
        ``(r,)``, all entries ``mean(s)``.
    """
    return s.mean().expand(s.shape).clone() if s.numel() else s.clone()


def project_onto(matrix: Tensor, basis: Tensor) -> Tensor:
    """``B Bᵀ X``: the projection of the columns of ``matrix`` on the span of ``basis``.

    Args:
        matrix: ``X (m, n)``.
        basis: ``B (m, c)`` with orthonormal columns (``c`` may be 0).

    Returns:
        ``(m, n)``.
    """
    return basis @ (basis.T @ matrix)  # (m, c) @ ((c, m) @ (m, n)) -> (m, n)


def project_out(matrix: Tensor, basis: Tensor) -> Tensor:
    """``X − B Bᵀ X``: what of ``matrix`` lies outside the span of ``basis``.

    Args:
        matrix: ``X (m, n)``.
        basis: ``B (m, c)`` with orthonormal columns.

    Returns:
        ``(m, n)``.
    """
    return matrix - project_onto(matrix, basis)


def mean_in_order(tensors: Sequence[Tensor]) -> Tensor:
    """``(Σ tensors) / T``, summed in the given (model-pool) order.

    Args:
        tensors: ``T >= 1`` tensors of one shape and dtype.

    Returns:
        the mean, of the same shape.
    """
    return sum_in_order(tensors) / len(tensors)


def matrix_or_mean(task_vectors: Sequence[Tensor], merge_matrix: Callable[[Sequence[Tensor]], Tensor]) -> Tensor:
    """Merge 2-D task vectors with ``merge_matrix``; every other shape by their mean.

    The rule shared by TSV-M, Iso-C and Iso-CTS (and the reference WUDI): the subspace merge is
    defined for matrices; biases, norms, class embeddings and convolution kernels are averaged.

    Args:
        task_vectors: ``τ_1..τ_T`` of one key.
        merge_matrix: the method's merge of ``T`` matrices ``(m, n)``.

    Returns:
        the merged task vector of that key.
    """
    if task_vectors[0].ndim == 2:
        return merge_matrix(task_vectors)
    return mean_in_order(task_vectors)


def subspace_merge_tensor(
    base: Tensor, finetuned: Sequence[Tensor], merge_matrix: Callable[[Sequence[Tensor]], Tensor], scale: float
) -> Tensor:
    """``θ0 + scale · matrix_or_mean(τ, merge_matrix)`` for one key: the per-key formula of TSV-M, Iso-C and Iso-CTS."""
    task_vectors = [theta - base for theta in finetuned]
    return base + scale * matrix_or_mean(task_vectors, merge_matrix)
