"""Continual TIES-Merging: each arriving task vector is TIES-merged with the running merged task vector.

Tang et al., *Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual
Model Merging*, 2025 (baselines). https://arxiv.org/abs/2501.09522 — TIES: Yadav et al., NeurIPS 2023,
https://arxiv.org/abs/2306.01708

As the reference: the first model gives θ = θ0 + λ τ1; model t > 1 gives θ ← θ + λ · TIES(θ − θ0, τt), where
TIES is :func:`~fusion_bench.method.task_vector.ties_merging.ties_merging` over the two task vectors (trim
each to its top ``threshold`` % by magnitude over the whole model, elect signs, disjoint ``merge_func``).
Note that the running merged task vector is added to again (θ grows by λ · TIES each step), exactly as the
reference does. Defaults are the reference's: λ 0.5, threshold 20, sum.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

from fusion_bench.method.base_algorithm import register_algorithm
from fusion_bench.method.continual.base import ContinualMergeAlgorithm
from fusion_bench.method._options import check_range
from fusion_bench.method.task_vector.ties_merging import check_ties_options, ties_merging

__all__ = ["continual_ties_merging_steps", "ContinualTiesMergingAlgorithm"]


def continual_ties_merging_steps(
    base: dict[str, Tensor],
    models: Iterable[dict[str, Tensor]],
    *,
    scaling_factor: float = 0.5,
    threshold: float = 20,
    merge_func: str = "sum",
) -> Iterator[dict[str, Tensor]]:
    """Yield the continual TIES merge after each model (see the module docstring)."""
    zeros = {k: torch.zeros_like(v) for k, v in base.items()}
    merged = None
    for task in models:
        task_tv = {k: task[k] - base[k] for k in base}
        if merged is None:
            update = task_tv
            merged = base
        else:
            merged_tv = {k: merged[k] - base[k] for k in base}
            update = ties_merging(
                zeros, [merged_tv, task_tv], scaling_factor=1.0, threshold=threshold, merge_func=merge_func
            )
        merged = {k: merged[k] + scaling_factor * update[k] for k in base}
        yield merged


@register_algorithm("continual_ties_merging")
class ContinualTiesMergingAlgorithm(ContinualMergeAlgorithm):
    """Continual TIES-Merging.

    Args:
        scaling_factor: λ, applied to every step's TIES merge.
        threshold: percent of each task vector kept by magnitude, whole model, in (0, 100].
        merge_func: ``sum`` (reference), ``mean`` or ``max``.
        shuffle_order, seed, task_order, evaluate_on_every_step, plot_path: see
            :class:`~fusion_bench.method.continual.base.ContinualMergeAlgorithm`.
    """

    def __init__(
        self,
        scaling_factor: float = 0.5,
        threshold: float = 20,
        merge_func: str = "sum",
        shuffle_order: bool = True,
        seed: int | None = None,
        task_order: list[str] | None = None,
        evaluate_on_every_step: bool = True,
        plot_path: str | None = None,
    ) -> None:
        self.scaling_factor = check_range("continual_ties_merging", "scaling_factor", scaling_factor)
        _, self.merge_func = check_ties_options("continual_ties_merging", threshold, merge_func)
        self.threshold = float(threshold)
        super().__init__(
            shuffle_order=shuffle_order,
            seed=seed,
            task_order=task_order,
            evaluate_on_every_step=evaluate_on_every_step,
            plot_path=plot_path,
        )

    def steps(self, base, models, *, layout):
        return continual_ties_merging_steps(
            base, models, scaling_factor=self.scaling_factor, threshold=self.threshold, merge_func=self.merge_func
        )
