"""Model Breadcrumbs: sparse task vectors without outliers, aggregated by task arithmetic.

Davari & Belilovsky, *Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks*, 2023.
https://arxiv.org/abs/2312.06795 (code: https://github.com/rezazzr/breadcrumbs)

Per tensor of each task vector, entries are ranked by magnitude: the largest ``gamma``
fraction (outliers) is dropped, the next ``beta`` fraction kept, the small rest dropped; then
``θ = θ0 + λ Σ_t masked τ_t``. Names and defaults follow the authors' code
(``find_best_hyperparam.py``, method ``middle_keep``: ``top_k_keep = beta``,
``top_k_remove = gamma``, default point beta = 0.15, gamma = 0.006). Two deliberate
differences: the authors rank each *row* (last dimension) and leave 0-d tensors unchanged,
we rank each whole tensor as the paper describes ("per layer"); λ = 0.3 is task arithmetic's
default (the paper tunes α on validation data).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.merge.tensors import order_statistics_
from fusion_bench.method.task_vector.core import TaskVectorTransform, family_core, plan_pool, sum_aggregate
from fusion_bench.method._options import check_range
from fusion_bench.merge.cores import pure_core
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.method.task_vector.task_arithmetic import task_arithmetic_merge
from fusion_bench.modelpool import BaseModelPool

__all__ = ["breadcrumbs_mask", "breadcrumbs_transform", "model_breadcrumbs", "ModelBreadcrumbsAlgorithm"]

StateDict = Mapping[str, torch.Tensor]


# ---- the mask -------------------------------------------------------------------------


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


def breadcrumbs_transform(beta: float, gamma: float) -> TaskVectorTransform:
    """The family transform ``(t, key, τ) -> τ ⊙ breadcrumbs_mask(τ, beta, gamma)``."""
    return lambda index, key, tv: torch.where(breadcrumbs_mask(tv, beta, gamma), tv, 0.0)


@pure_core()
def model_breadcrumbs(
    base: StateDict,
    finetuned: Sequence[StateDict],
    *,
    scaling_factor: float = 0.3,
    beta: float = 0.15,
    gamma: float = 0.006,
) -> dict[str, torch.Tensor]:
    """Model Breadcrumbs over whole state dicts (the pure core).

    Args:
        base: θ0.
        finetuned: θ_1..θ_T in pool order.
        scaling_factor: λ.
        beta: fraction of each tensor kept, in (0, 1].
        gamma: fraction of each tensor's largest entries dropped first, in [0, 1).

    Returns:
        ``θ0 + λ Σ_t breadcrumbs(τ_t)``.
    """
    return family_core(
        base,
        finetuned,
        aggregate=sum_aggregate,
        scaling_factor=scaling_factor,
        transform=breadcrumbs_transform(beta, gamma),
    )


@register_algorithm("model_breadcrumbs", core=model_breadcrumbs)
class ModelBreadcrumbsAlgorithm(BaseAlgorithm):
    """Model Breadcrumbs, streamed (purely per tensor: no whole-model pass).

    Args:
        scaling_factor: λ.
        beta: fraction of each tensor kept (after the outliers), in (0, 1].
        gamma: fraction of each tensor's largest-magnitude entries dropped, in [0, 1).
    """

    def __init__(self, scaling_factor: float = 0.3, beta: float = 0.15, gamma: float = 0.006) -> None:
        name = "model_breadcrumbs"
        self.scaling_factor = check_range(name, "scaling_factor", scaling_factor)
        self.beta = check_range(
            name, "beta", beta, low=0, high=1, low_open=True, hint=" (fraction of each tensor kept)"
        )
        self.gamma = check_range(
            name,
            "gamma",
            gamma,
            low=0,
            high=1,
            high_open=True,
            hint=" (fraction of the largest entries dropped as outliers)",
        )

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        return task_arithmetic_merge(
            modelpool,
            plan_pool(modelpool),
            scaling_factor=self.scaling_factor,
            transform=breadcrumbs_transform(self.beta, self.gamma),
            desc="model breadcrumbs",
        )
