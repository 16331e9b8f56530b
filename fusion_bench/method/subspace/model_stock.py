"""Model Stock: ``θ = t · mean(θ_i) + (1 − t) · θ0`` with ``t`` from the angle between task vectors.

Jang et al., *Model Stock: All we need is just a few fine-tuned models*, ECCV 2024.
https://arxiv.org/abs/2403.19522 (code: github.com/naver-ai/model-stock; FusionBench ``ModelStock``).

Per tensor: ``θ`` is the mean pairwise angle between the task vectors ``τ_i = θ_i − θ0``
(``cos = ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖ + 1e-8)``, clamped to [−1, 1]), and

    t = T cos θ / ((T − 1) cos θ + 1 + 1e-8).

The ``1e-8`` terms are the reference's (they make an all-zero ``τ`` give ``t = 0``, i.e. θ0, which
equals the mean there). Angles are averaged (not cosines), over the ``T (T − 1) / 2`` pairs, as the
reference's N-model branch; dot products are taken in float64. Needs at least 2 fine-tuned models.
As in the reference, nothing guards ``(T − 1) cos θ + 1 ≈ 0`` (task vectors about
``arccos(−1/(T − 1))`` apart, far from the fine-tuned-from-one-model setting the method assumes).
No hyperparameters. The reference's ``ignore_keys`` name OpenCLIP text-tower tensors, which a
vision pool does not hold.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Mapping, Sequence

from torch import Tensor, nn

from fusion_bench.merge import stream_merge
from fusion_bench.method.subspace.svd import mean_in_order
from fusion_bench.merge.cores import pure_core
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool

__all__ = [
    "EPS",
    "task_vector_cosine",
    "mean_pairwise_angle",
    "model_stock_ratio",
    "model_stock_tensor",
    "model_stock",
    "ModelStockAlgorithm",
]

StateDict = Mapping[str, Tensor]
EPS = 1e-8


def task_vector_cosine(a: Tensor, b: Tensor) -> float:
    """``⟨a, b⟩ / (‖a‖ ‖b‖ + 1e-8)`` over all entries, in float64, clamped to [−1, 1].

    Args:
        a, b: two task vectors of one shape.

    Returns:
        the cosine.
    """
    a, b = a.double().flatten(), b.double().flatten()
    cos = (a @ b).item() / (math.sqrt((a @ a).item() * (b @ b).item()) + EPS)
    return min(1.0, max(-1.0, cos))


def mean_pairwise_angle(task_vectors: Sequence[Tensor]) -> float:
    """The mean over pairs ``i < j`` of ``arccos(cos(τ_i, τ_j))``, in radians.

    Args:
        task_vectors: ``T >= 2`` task vectors of one shape.

    Returns:
        the mean angle.
    """
    angles = [math.acos(task_vector_cosine(a, b)) for a, b in combinations(task_vectors, 2)]
    return sum(angles) / len(angles)


def model_stock_ratio(angle: float, num_models: int) -> float:
    """``t = T cos θ / ((T − 1) cos θ + 1 + 1e-8)``.

    Args:
        angle: θ in radians.
        num_models: ``T``.

    Returns:
        the interpolation ratio ``t`` toward the mean of the fine-tuned models.
    """
    cos = math.cos(angle)
    return num_models * cos / ((num_models - 1) * cos + 1 + EPS)


def model_stock_tensor(base: Tensor, finetuned: Sequence[Tensor]) -> Tensor:
    """Model Stock for one key: ``t · mean(θ_i) + (1 − t) · θ0``.

    Args:
        base: θ0's tensor.
        finetuned: θ_1..θ_T's tensors (``T >= 2``), in pool order.

    Returns:
        the merged tensor.
    """
    t = model_stock_ratio(mean_pairwise_angle([theta - base for theta in finetuned]), len(finetuned))
    return mean_in_order(finetuned) * t + base * (1.0 - t)


@pure_core()
def model_stock(base: StateDict, finetuned: Sequence[StateDict]) -> dict[str, Tensor]:
    """Model Stock over whole state dicts (the pure core).

    Args:
        base: θ0 (floating tensors only).
        finetuned: θ_1..θ_T in pool order, ``T >= 2``.

    Returns:
        the merged state dict.
    """
    return {k: model_stock_tensor(base[k], [sd[k] for sd in finetuned]) for k in base}


@register_algorithm("model_stock", core=model_stock)
class ModelStockAlgorithm(BaseAlgorithm):
    """Model Stock, streamed key by key (see the module docstring); no hyperparameters."""

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        return stream_merge(
            modelpool, lambda key, base, thetas: model_stock_tensor(base, thetas), min_models=2, desc="Model Stock"
        )
