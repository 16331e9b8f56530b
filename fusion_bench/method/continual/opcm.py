"""OPCM: orthogonal projection-based continual merging.

Tang et al., *Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual
Model Merging*, 2025. https://arxiv.org/abs/2501.09522

The models arrive one at a time (see :mod:`fusion_bench.method.continual.base` for the order). With θ0 the
pre-trained model, the merge starts as θ1 itself, λ1 = 1. When model t arrives (τt = θt − θ0, τ̄ the running
merged task vector θ_{t−1} − θ0):

1. for the weight W of every ``nn.Linear``: U S Vᵀ = svd(τ̄_W) (full matrices); r = the first index where
   cumsum(S) / ΣS > α (0 if none); P = Uᵀ τt_W V with its diagonal and its top-left r × r block set to 0
   (the components along the merged model's dominant singular directions); the cleaned update is U P Vᵀ.
   Every other tensor takes τt as it is, except (as the reference) parameters held directly by a
   module with children (CLIP's ``class_embedding``), which take no new task: their τ̄ enters step 2 as it is
   (``merge_non_leaf_parameters: true`` merges them like the rest);
2. S = λ_{t−1} · τ̄ + cleaned update, per tensor;
3. n̄ = the mean of ‖τ1‖, …, ‖τt‖ (whole-model L2 norms), λt = ‖S‖ / n̄ and θt_merged = θ0 + S / λt: the
   merged task vector is rescaled to the average task-vector norm.

Defaults are the reference's (``alpha`` 0.5, shuffled order); see docs/algorithms.md. A zero ``S`` leaves θ0.
"""

from __future__ import annotations

import math
from typing import Collection, Iterable, Iterator

import torch
from torch import Tensor

from fusion_bench.method._options import check_bool, check_range
from fusion_bench.method.base_algorithm import register_algorithm
from fusion_bench.method.continual.base import ContinualMergeAlgorithm, ModelLayout

__all__ = ["opcm_split_rank", "opcm_project", "task_vector_norm", "opcm_steps", "OPCMAlgorithm"]


def opcm_split_rank(singular_values: Tensor, alpha: float) -> int:
    """The first index r where ``cumsum(s) / sum(s) > alpha`` (0 when there is none, e.g. ``s`` all 0)."""
    ratio = singular_values.cumsum(0) / singular_values.sum()
    above = ratio > alpha
    return int(torch.nonzero(above)[0, 0]) if bool(above.any()) else 0


def opcm_project(merged_tv: Tensor, task_tv: Tensor, alpha: float) -> Tensor:
    """The part of ``task_tv`` OPCM adds to a linear weight whose merged task vector is ``merged_tv``.

    Args:
        merged_tv: the running merged task vector of the weight, ``(m, n)``.
        task_tv: the new task's task vector, ``(m, n)``.
        alpha: the share of ΣS that defines the protected top-left block.

    Returns:
        ``U P Vᵀ`` with ``P = Uᵀ task_tv V``, diagonal and ``P[:r, :r]`` zeroed.
    """
    u, s, vh = torch.linalg.svd(merged_tv, full_matrices=True)
    rank = opcm_split_rank(s, alpha)
    projected = u.T @ task_tv @ vh.T
    projected.diagonal().zero_()
    projected[:rank, :rank] = 0
    return u @ projected @ vh


def task_vector_norm(tensors: Iterable[Tensor]) -> float:
    """The L2 norm of the task vector given tensor by tensor (accumulated in float64)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def opcm_steps(
    base: dict[str, Tensor],
    models: Iterable[dict[str, Tensor]],
    *,
    alpha: float = 0.5,
    linear_keys: Collection[str],
    frozen_keys: Collection[str] = (),
    device: torch.device | str = "cpu",
) -> Iterator[dict[str, Tensor]]:
    """Yield the OPCM merge after each model (floating tensors; see the module docstring).

    Args:
        base: θ0's floating tensors.
        models: the fine-tuned models' floating tensors, in merge order (read lazily).
        alpha: the projection's share of the singular values.
        linear_keys: the keys of linear weights (projected); every other key is added as is.
        frozen_keys: keys that take no new task: their merged task vector τ̄ enters S as it is (not
            times λ_{t−1}), then is rescaled with the rest (the reference's treatment of parameters held
            by modules with children).
        device: where the SVDs run (the results come back to the tensors' device).
    """
    models = iter(models)
    merged = dict(next(models))  # θ1 itself
    norms = [task_vector_norm(merged[k] - base[k] for k in base)]
    previous_lambda = 1.0
    yield merged
    for task in models:
        norms.append(task_vector_norm(task[k] - base[k] for k in base))
        average = sum(norms) / len(norms)
        update = {}
        for key, theta0 in base.items():
            merged_tv, task_tv = merged[key] - theta0, task[key] - theta0
            if key in frozen_keys:
                update[key] = merged_tv
                continue
            if key in linear_keys and merged_tv.dim() == 2:
                task_tv = opcm_project(merged_tv.to(device), task_tv.to(device), alpha).to(merged_tv.device)
            update[key] = previous_lambda * merged_tv + task_tv
        norm = task_vector_norm(update.values())
        scale = average / norm if norm > 0 else 0.0
        merged = {key: base[key] + update[key] * scale for key in base}
        previous_lambda = norm / average
        yield merged


@register_algorithm("opcm")
class OPCMAlgorithm(ContinualMergeAlgorithm):
    """OPCM (see the module docstring and :class:`~fusion_bench.method.continual.base.ContinualMergeAlgorithm`).

    Args:
        alpha: the share of the merged task vector's singular values whose directions the new task may not
            write into (the top-left block of the projection), in [0, 1].
        merge_non_leaf_parameters: also merge parameters held directly by modules with children (CLIP's
            ``class_embedding``); the reference (false) leaves them out of the merge, so they keep the first
            model's task vector, shrunk by every step's rescaling.
        shuffle_order, seed, task_order, evaluate_on_every_step, plot_path: see the base class.
    """

    def __init__(
        self,
        alpha: float = 0.5,
        merge_non_leaf_parameters: bool = False,
        shuffle_order: bool = True,
        seed: int | None = None,
        task_order: list[str] | None = None,
        evaluate_on_every_step: bool = True,
        plot_path: str | None = None,
    ) -> None:
        self.alpha = check_range("opcm", "alpha", alpha, low=0.0, high=1.0)
        self.merge_non_leaf_parameters = check_bool("opcm", "merge_non_leaf_parameters", merge_non_leaf_parameters)
        super().__init__(
            shuffle_order=shuffle_order,
            seed=seed,
            task_order=task_order,
            evaluate_on_every_step=evaluate_on_every_step,
            plot_path=plot_path,
        )

    def steps(self, base, models, *, layout: ModelLayout):
        device = self.fabric.device if self.fabric is not None else "cpu"
        frozen = () if self.merge_non_leaf_parameters else layout.non_leaf
        return opcm_steps(base, models, alpha=self.alpha, linear_keys=layout.linear, frozen_keys=frozen, device=device)
