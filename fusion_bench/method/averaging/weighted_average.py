"""Weighted averaging: ``θ = Σ_i w_i θ_i`` (θ0 not included).

Wortsman et al., *Model soups*, ICML 2022. https://arxiv.org/abs/2203.05482 (uniform weights
give the uniform soup). Reference: FusionBench ``config/method/linear/weighted_average.yaml``
(``normalize: true``, one weight per model). ``weights: null`` means equal weights.
With ``normalize`` (default) the weights are divided by their sum, so they sum to 1.
Accumulated in model-pool order; works without a ``_pretrained_`` model.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from fusion_bench.errors import ConfigError
from fusion_bench.merge import stream_merge
from fusion_bench.method._options import check_bool, check_number_list
from fusion_bench.merge.cores import pure_core
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool

__all__ = [
    "resolve_weights",
    "weight_options",
    "weighted_average_tensor",
    "weighted_average",
    "WeightedAverageAlgorithm",
]

NAME = "weighted_average"


def resolve_weights(
    weights: Sequence[float] | None,
    names: Sequence[str],
    *,
    normalize: bool,
    method: str = NAME,
    equal: float = 1.0,
) -> list[float]:
    """One weight per model in pool order (``equal`` each if ``weights`` is None; normalised to sum 1 if
    ``normalize``); ``method`` names the method in the messages.

    Raises:
        ConfigError: a count that differs from the number of models (naming both), or
            weights summing to 0 when they must be normalised.
    """
    values = [equal] * len(names) if weights is None else [float(w) for w in weights]
    if len(values) != len(names):
        raise ConfigError(
            f"{method}: option 'weights' has {len(values)} entries but the pool has {len(names)} fine-tuned models "
            f"{list(names)}; give one weight per model, in pool order"
        )
    if not normalize:
        return values
    total = sum(values)
    if total == 0:
        raise ConfigError(
            f"{method}: option 'weights' {values} sums to 0 and cannot be normalised; set normalize: false"
        )
    return [w / total for w in values]


def weight_options(method: str, weights: Sequence[float] | None, normalize: bool) -> tuple[list[float] | None, bool]:
    """The checked ``weights`` and ``normalize`` options of a weighted method (averaging or ensemble): numbers,
    a boolean, and weights that must be normalised but sum to 0 refused at once, before any model is read.

    Raises:
        ConfigError: as :func:`resolve_weights` (the count is checked later, against the pool).
    """
    values = None if weights is None else check_number_list(method, "weights", weights)
    normalize = check_bool(method, "normalize", normalize)
    if values is not None and normalize:
        resolve_weights(values, [str(i) for i in range(len(values))], normalize=True, method=method)  # sum 0 raises
    return values, normalize


def weighted_average_tensor(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """``Σ_i w_i · tensors[i]``, accumulated in order."""
    total = torch.zeros_like(tensors[0])
    for w, t in zip(weights, tensors):
        total += w * t
    return total


@pure_core(with_base=False)
def weighted_average(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | None = None, *, normalize: bool = True
) -> dict[str, torch.Tensor]:
    """Weighted average of whole state dicts (the pure core)."""
    w = resolve_weights(weights, [str(i) for i in range(len(state_dicts))], normalize=normalize)
    return {k: weighted_average_tensor([sd[k] for sd in state_dicts], w) for k in state_dicts[0]}


@register_algorithm("weighted_average", core=weighted_average)
class WeightedAverageAlgorithm(BaseAlgorithm):
    """Weighted average of the pool's fine-tuned models, streamed.

    Args:
        weights: one weight per fine-tuned model in pool order; null: equal weights.
        normalize: divide the weights by their sum.
    """

    def __init__(self, weights: Sequence[float] | None = None, normalize: bool = True) -> None:
        self.weights, self.normalize = weight_options(NAME, weights, normalize)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        weights = resolve_weights(self.weights, modelpool.model_names, normalize=self.normalize)
        return stream_merge(
            modelpool,
            lambda key, base, thetas: weighted_average_tensor(thetas, weights),
            with_base=False,
            desc="weighted average",
        )
