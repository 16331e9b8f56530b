"""Continual task arithmetic: θ ← θ + λ τt as each model arrives (a sequential baseline of OPCM).

Tang et al., *Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual
Model Merging*, 2025 (baselines). https://arxiv.org/abs/2501.09522 — task arithmetic: Ilharco et al.,
ICLR 2023, https://arxiv.org/abs/2212.04089

Starting from θ0, model t adds λ (θt − θ0); after all T models it is task arithmetic (up to the order of
the additions). Default λ = 0.3 (the reference's).
"""

from __future__ import annotations

from typing import Iterable, Iterator

from torch import Tensor

from fusion_bench.method._options import check_range
from fusion_bench.method.base_algorithm import register_algorithm
from fusion_bench.method.continual.base import ContinualMergeAlgorithm

__all__ = ["continual_task_arithmetic_steps", "ContinualTaskArithmeticAlgorithm"]


def continual_task_arithmetic_steps(
    base: dict[str, Tensor], models: Iterable[dict[str, Tensor]], *, scaling_factor: float = 0.3
) -> Iterator[dict[str, Tensor]]:
    """Yield ``θ0 + λ Σ_{s ≤ t} τs`` after each model (added one model at a time)."""
    merged = {k: v.clone() for k, v in base.items()}
    for task in models:
        merged = {k: merged[k] + scaling_factor * (task[k] - base[k]) for k in base}
        yield merged


@register_algorithm("continual_task_arithmetic")
class ContinualTaskArithmeticAlgorithm(ContinualMergeAlgorithm):
    """Continual task arithmetic.

    Args:
        scaling_factor: λ.
        shuffle_order, seed, task_order, evaluate_on_every_step, plot_path: see
            :class:`~fusion_bench.method.continual.base.ContinualMergeAlgorithm`.
    """

    def __init__(
        self,
        scaling_factor: float = 0.3,
        shuffle_order: bool = True,
        seed: int | None = None,
        task_order: list[str] | None = None,
        evaluate_on_every_step: bool = True,
        plot_path: str | None = None,
    ) -> None:
        self.scaling_factor = check_range("continual_task_arithmetic", "scaling_factor", scaling_factor)
        super().__init__(
            shuffle_order=shuffle_order,
            seed=seed,
            task_order=task_order,
            evaluate_on_every_step=evaluate_on_every_step,
            plot_path=plot_path,
        )

    def steps(self, base, models, *, layout):
        return continual_task_arithmetic_steps(base, models, scaling_factor=self.scaling_factor)
