"""Simple ensemble: the mean of the experts' outputs.

The output-ensemble baseline of model-merging papers, e.g. Wortsman et al., *Model soups*, ICML
2022 (https://arxiv.org/abs/2203.05482), which compares weight averaging with it. As the reference
FusionBench ``SimpleEnsembleAlgorithm`` (``config/method/ensemble/simple_ensemble.yaml``, no
options): for CLIP vision encoders the pooled features of the fine-tuned models are averaged before
the projection and the zero-shot head. ``_pretrained_`` is not a member.
"""

from __future__ import annotations

from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.models.ensemble import EnsembleCLIPVisionModel

__all__ = ["SimpleEnsembleAlgorithm"]


@register_algorithm("simple_ensemble")
class SimpleEnsembleAlgorithm(BaseAlgorithm):
    """Average the outputs of the pool's fine-tuned models."""

    def run(self, modelpool: BaseModelPool) -> EnsembleCLIPVisionModel:
        models = [modelpool.load_model(name) for name in modelpool.model_names]
        return EnsembleCLIPVisionModel(models, mode="mean", names=modelpool.model_names)
