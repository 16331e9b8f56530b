"""Continual averaging: the running mean of the models seen so far (a sequential baseline of OPCM).

Tang et al., *Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual
Model Merging*, 2025 (baselines). https://arxiv.org/abs/2501.09522 — averaging: Wortsman et al., *Model
soups*, ICML 2022, https://arxiv.org/abs/2203.05482

θ ← θ1, then θ ← ((t − 1) θ + θt) / t: after all T models, the simple average. θ0 is not used.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from torch import Tensor

from fusion_bench.method.base_algorithm import register_algorithm
from fusion_bench.method.continual.base import ContinualMergeAlgorithm

__all__ = ["continual_simple_average_steps", "ContinualSimpleAverageAlgorithm"]


def continual_simple_average_steps(models: Iterable[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
    """Yield the running mean after each model: ``((t − 1) θ + θt) / t``."""
    merged = None
    for count, task in enumerate(models, start=1):
        merged = dict(task) if merged is None else {k: (merged[k] * (count - 1) + task[k]) / count for k in merged}
        yield merged


@register_algorithm("continual_simple_average")
class ContinualSimpleAverageAlgorithm(ContinualMergeAlgorithm):
    """Continual averaging (options: see :class:`~fusion_bench.method.continual.base.ContinualMergeAlgorithm`)."""

    needs_base = False

    def __init__(
        self,
        shuffle_order: bool = True,
        seed: int | None = None,
        task_order: list[str] | None = None,
        evaluate_on_every_step: bool = True,
        plot_path: str | None = None,
    ) -> None:
        super().__init__(
            shuffle_order=shuffle_order,
            seed=seed,
            task_order=task_order,
            evaluate_on_every_step=evaluate_on_every_step,
            plot_path=plot_path,
        )

    def steps(self, base, models, *, layout):
        return continual_simple_average_steps(models)
