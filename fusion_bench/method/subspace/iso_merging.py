"""Isotropic merging, Iso-C and Iso-CTS: ``θ = θ0 + α · M``.

Marczak et al., *No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces*, 2025. https://arxiv.org/abs/2502.04959 (code: github.com/danielm1405/iso-merging,
``iso_c`` / ``iso_cts``; FusionBench ``ISO_C_Merge`` / ``ISO_CTS_Merge``).

* **Iso-C** (``iso_c``), per 2-D tensor: ``M = Σ_i τ_i = U S Vᵀ``, then every singular value is
  replaced by their mean: ``M = U (mean(S) I) Vᵀ``.
* **Iso-CTS** (``iso_cts``), per 2-D tensor of rank ``r = min(m, n)``: the common subspace is the
  top ``c`` left singular vectors of ``Σ_i τ_i``; each task adds its top ``(r − c) / T``
  directions of ``τ_i − U_c U_cᵀ τ_i`` (what lies outside the common subspace); the ``r``
  collected ``U`` columns and ``V`` rows are orthogonalised by their polar factors and the
  concatenated singular values are replaced by their mean. As the reference, ``c`` starts at
  ``int(r · common_space_fraction)`` and is then lowered so the task-specific part divides by
  ``T``: ``c = r − round((r − c) / T) · T`` (Python's ``round``, ties to even). Where that
  rounding would leave ``c < 0`` (tiny matrices, many tasks; the reference breaks there) the
  task-specific share is rounded down instead.

Every other tensor (biases, norms, class embedding, patch convolution): the mean of ``τ_i``, as
the paper's code (``iso_utils``: "Combining by avg"); it is scaled by α like the matrices.

Defaults: ``scaling_factor`` α = 1.0 (FusionBench's configs); the paper selects α on validation
data and the published tables used α = 1.5 for these methods. ``common_space_fraction`` = 0.8
(paper and FusionBench).
"""

from __future__ import annotations

from functools import partial
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.merge import stream_merge
from fusion_bench.method.subspace.svd import (
    compose,
    isotropic_spectrum,
    polar_factor,
    project_out,
    subspace_merge_tensor,
    thin_svd,
    truncated_svd,
)
from fusion_bench.merge.tensors import sum_in_order
from fusion_bench.method._options import check_range
from fusion_bench.merge.cores import pure_core
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool

__all__ = [
    "iso_c_matrix",
    "iso_cts_subspace_sizes",
    "iso_cts_matrix",
    "iso_c",
    "iso_cts",
    "IsoCAlgorithm",
    "IsoCTSAlgorithm",
]

StateDict = Mapping[str, Tensor]


def iso_c_matrix(task_vectors: Sequence[Tensor]) -> Tensor:
    """Iso-C's merge of one key's matrices: ``Σ τ_i`` with a flat spectrum.

    Args:
        task_vectors: ``τ_1..τ_T``, each ``(m, n)``.

    Returns:
        ``U (mean(S) I) Vᵀ`` of ``Σ τ_i``, ``(m, n)``.
    """
    u, s, vh = thin_svd(sum_in_order(task_vectors))  # (m, r), (r,), (r, n)
    return compose(u, isotropic_spectrum(s), vh)


def iso_cts_subspace_sizes(rank: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """Iso-CTS's ``(c, per_task)``: the common subspace size and each task's share.

    ``c + num_tasks · per_task == rank`` (see the module docstring for the rounding).

    Args:
        rank: ``r = min(m, n)``.
        num_tasks: ``T``.
        common_space_fraction: the target fraction of ``r`` given to the common subspace.

    Returns:
        ``(c, per_task)``.
    """
    common = int(rank * common_space_fraction)
    per_task = min(round((rank - common) / num_tasks), rank // num_tasks)
    return rank - per_task * num_tasks, per_task


def iso_cts_matrix(task_vectors: Sequence[Tensor], *, common_space_fraction: float) -> Tensor:
    """Iso-CTS's merge of one key's matrices (common + task-specific subspaces, flat spectrum).

    Args:
        task_vectors: ``τ_1..τ_T``, each ``(m, n)``.
        common_space_fraction: see :func:`iso_cts_subspace_sizes`.

    Returns:
        ``U⊥ (mean(S) I) V⊥ᵀ``, ``(m, n)``.
    """
    m, n = task_vectors[0].shape
    common, per_task = iso_cts_subspace_sizes(min(m, n), len(task_vectors), common_space_fraction)
    u_c, s_c, vh_c = truncated_svd(sum_in_order(task_vectors), common)  # (m, c), (c,), (c, n)
    parts = [truncated_svd(project_out(tv, u_c), per_task) for tv in task_vectors]  # (m, p), (p,), (p, n)
    u_cat = torch.cat([u for u, _, _ in parts] + [u_c], dim=1)  # (m, r): task-specific first, as the reference
    s_cat = torch.cat([s for _, s, _ in parts] + [s_c])  # (r,)
    vh_cat = torch.cat([vh for _, _, vh in parts] + [vh_c], dim=0)  # (r, n)
    return compose(polar_factor(u_cat), isotropic_spectrum(s_cat), polar_factor(vh_cat))


@pure_core()
def iso_c(base: StateDict, finetuned: Sequence[StateDict], *, scaling_factor: float = 1.0) -> dict[str, Tensor]:
    """Iso-C over whole state dicts (the pure core).

    Args:
        base: θ0 (floating tensors only).
        finetuned: θ_1..θ_T in pool order.
        scaling_factor: α.

    Returns:
        the merged state dict.
    """
    return {k: subspace_merge_tensor(base[k], [sd[k] for sd in finetuned], iso_c_matrix, scaling_factor) for k in base}


@pure_core()
def iso_cts(
    base: StateDict, finetuned: Sequence[StateDict], *, scaling_factor: float = 1.0, common_space_fraction: float = 0.8
) -> dict[str, Tensor]:
    """Iso-CTS over whole state dicts (the pure core).

    Args:
        base: θ0 (floating tensors only).
        finetuned: θ_1..θ_T in pool order.
        scaling_factor: α.
        common_space_fraction: the share of each matrix's rank given to the common subspace.

    Returns:
        the merged state dict.
    """
    merge = partial(iso_cts_matrix, common_space_fraction=common_space_fraction)
    return {k: subspace_merge_tensor(base[k], [sd[k] for sd in finetuned], merge, scaling_factor) for k in base}


@register_algorithm("iso_c", core=iso_c)
class IsoCAlgorithm(BaseAlgorithm):
    """Iso-C, streamed key by key (see the module docstring).

    Args:
        scaling_factor: α (default 1.0; the published tables used 1.5).
    """

    def __init__(self, scaling_factor: float = 1.0) -> None:
        self.scaling_factor = check_range("iso_c", "scaling_factor", scaling_factor)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        return stream_merge(
            modelpool,
            lambda key, base, thetas: subspace_merge_tensor(base, thetas, iso_c_matrix, self.scaling_factor),
            desc="Iso-C",
        )


@register_algorithm("iso_cts", core=iso_cts)
class IsoCTSAlgorithm(BaseAlgorithm):
    """Iso-CTS, streamed key by key (see the module docstring).

    Args:
        scaling_factor: α (default 1.0; the published tables used 1.5).
        common_space_fraction: share of each matrix's rank given to the common subspace, in (0, 1).
    """

    def __init__(self, scaling_factor: float = 1.0, common_space_fraction: float = 0.8) -> None:
        self.scaling_factor = check_range("iso_cts", "scaling_factor", scaling_factor)
        self.common_space_fraction = check_range(
            "iso_cts",
            "common_space_fraction",
            common_space_fraction,
            low=0,
            high=1,
            low_open=True,
            high_open=True,
            hint=" (share of each matrix's rank given to the common subspace)",
        )

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        merge = partial(iso_cts_matrix, common_space_fraction=self.common_space_fraction)
        return stream_merge(
            modelpool,
            lambda key, base, thetas: subspace_merge_tensor(base, thetas, merge, self.scaling_factor),
            desc="Iso-CTS",
        )
