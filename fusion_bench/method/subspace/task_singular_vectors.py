"""TSV-M (Task Singular Vectors: Merge): ``θ = θ0 + α · merged``.

Gargiulo et al., *Task Singular Vectors: Reducing Task Interference in Model Merging*,
CVPR 2025. https://arxiv.org/abs/2412.00081 (code: github.com/AntoAndGar/task_singular_vectors,
``compute_and_sum_svd_mem_reduction``; FusionBench ``TaskSingularVectorMerging``).

Per 2-D tensor: the SVD of each task vector ``τ_i = U_i S_i V_iᵀ`` keeps its ``k = min(m, n) // T``
leading triplets; the kept ``U``, ``S`` and ``V`` of all tasks are concatenated (pool order),
``U_cat`` and ``V_cat`` are replaced by their polar factors (``P Qᵀ`` of their SVD: the nearest
matrices with orthonormal columns, which removes the interference between tasks' singular
vectors), and ``merged = U⊥ diag(S_cat) V⊥ᵀ``. Every other tensor: the mean of ``τ_i``.

Default ``alpha`` (α) = 1, as the reference (FusionBench ``alpha: 1``; the original code adds the
merged vector unscaled). The reference pads ``U_cat`` with zero columns up to ``min(m, n)``; the
zero columns meet zero singular values, so the result is the same as this unpadded form.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.merge import stream_merge
from fusion_bench.method.subspace.svd import compose, polar_factor, subspace_merge_tensor, truncated_svd
from fusion_bench.method._options import check_range
from fusion_bench.merge.cores import pure_core
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool

__all__ = ["tsv_merge_matrix", "tsv_merging_tensor", "tsv_merging", "TSVMergingAlgorithm"]

StateDict = Mapping[str, Tensor]


def tsv_merge_matrix(task_vectors: Sequence[Tensor]) -> Tensor:
    """TSV-M's merge of one key's ``T`` task-vector matrices (before scaling by α).

    Args:
        task_vectors: ``τ_1..τ_T``, each ``(m, n)``.

    Returns:
        ``U⊥ diag(S_cat) V⊥ᵀ`` of shape ``(m, n)``; zeros when ``T > min(m, n)`` (``k = 0``).
    """
    m, n = task_vectors[0].shape
    k = min(m, n) // len(task_vectors)
    if k == 0:
        return torch.zeros_like(task_vectors[0])
    parts = [truncated_svd(tv, k) for tv in task_vectors]  # each U (m, k), S (k,), Vh (k, n)
    u_cat = torch.cat([u for u, _, _ in parts], dim=1)  # (m, T·k)
    s_cat = torch.cat([s for _, s, _ in parts])  # (T·k,)
    vh_cat = torch.cat([vh for _, _, vh in parts], dim=0)  # (T·k, n)
    return compose(polar_factor(u_cat), s_cat, polar_factor(vh_cat))  # (m, n)


def tsv_merging_tensor(base: Tensor, finetuned: Sequence[Tensor], *, alpha: float = 1.0) -> Tensor:
    """``θ0 + α · merged`` for one key (2-D: :func:`tsv_merge_matrix`; else the mean of ``τ``).

    Args:
        base: θ0's tensor.
        finetuned: θ_1..θ_T's tensors, in pool order.
        alpha: α, the scale of the merged task vector.

    Returns:
        the merged tensor.
    """
    return subspace_merge_tensor(base, finetuned, tsv_merge_matrix, alpha)


@pure_core()
def tsv_merging(base: StateDict, finetuned: Sequence[StateDict], *, alpha: float = 1.0) -> dict[str, Tensor]:
    """TSV-M over whole state dicts (the pure core; the streamed algorithm gives the same tensors).

    Args:
        base: θ0 (floating tensors only).
        finetuned: θ_1..θ_T in pool order.
        alpha: α.

    Returns:
        the merged state dict.
    """
    return {k: tsv_merging_tensor(base[k], [sd[k] for sd in finetuned], alpha=alpha) for k in base}


@register_algorithm("tsv_merging", core=tsv_merging)
class TSVMergingAlgorithm(BaseAlgorithm):
    """TSV-M, streamed key by key (see the module docstring).

    Args:
        alpha: α, the scale of the merged task vector (reference: 1).
    """

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = check_range("tsv_merging", "alpha", alpha)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        return stream_merge(
            modelpool,
            lambda key, base, thetas: tsv_merging_tensor(base, thetas, alpha=self.alpha),
            desc="TSV-M",
        )
