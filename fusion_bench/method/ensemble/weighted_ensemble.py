"""Weighted ensemble: ``Σ_i w_i · f_i(x)`` over the experts' outputs.

The weighted output ensemble (cf. Wortsman et al., *Model soups*, ICML 2022,
https://arxiv.org/abs/2203.05482). Defaults as the reference FusionBench
``config/method/ensemble/weighted_ensemble.yaml``: ``weights: null`` (equal weights) and
``normalize: true`` (weights divided by their sum). For CLIP vision encoders the pooled features
are combined before the projection and the zero-shot head.
"""

from __future__ import annotations

from typing import Sequence

from fusion_bench.method.averaging.weighted_average import resolve_weights, weight_options
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.models.ensemble import EnsembleCLIPVisionModel

__all__ = ["ensemble_weights", "WeightedEnsembleAlgorithm"]

NAME = "weighted_ensemble"


def ensemble_weights(weights: Sequence[float] | None, names: Sequence[str], *, normalize: bool) -> list[float]:
    """One weight per model in pool order (1/n each if None; divided by their sum if ``normalize``): the
    weighted average's rule with equal weights 1/n.

    Raises:
        ConfigError: a count that differs from the number of models, or weights summing to 0
            that must be normalised.
    """
    return resolve_weights(weights, names, normalize=normalize, method=NAME, equal=1.0 / len(names))


@register_algorithm(NAME)
class WeightedEnsembleAlgorithm(BaseAlgorithm):
    """Weighted sum of the outputs of the pool's fine-tuned models.

    Args:
        weights: one weight per fine-tuned model in pool order; null: equal weights.
        normalize: divide the weights by their sum.
    """

    def __init__(self, weights: Sequence[float] | None = None, normalize: bool = True) -> None:
        self.weights, self.normalize = weight_options(NAME, weights, normalize)

    def run(self, modelpool: BaseModelPool) -> EnsembleCLIPVisionModel:
        weights = ensemble_weights(self.weights, modelpool.model_names, normalize=self.normalize)
        models = [modelpool.load_model(name) for name in modelpool.model_names]
        return EnsembleCLIPVisionModel(models, mode="weighted", weights=weights, names=modelpool.model_names)
