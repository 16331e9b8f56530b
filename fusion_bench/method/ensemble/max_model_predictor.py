"""Max-model predictor: the element-wise maximum of the experts' outputs.

As the reference FusionBench ``MaxModelPredictorAlgorithm``
(``config/method/ensemble/max_model_predictor.yaml``, no options): every output entry is the
largest value any fine-tuned model gives it; for CLIP vision encoders that is the element-wise
maximum of the pooled features, before the projection and the zero-shot head. A baseline of the
FusionBench benchmark paper (Tang et al., *FusionBench: A Comprehensive Benchmark of Deep Model
Fusion*, https://arxiv.org/abs/2406.03280).
"""

from __future__ import annotations

from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.models.ensemble import EnsembleCLIPVisionModel

__all__ = ["MaxModelPredictorAlgorithm"]


@register_algorithm("max_model_predictor")
class MaxModelPredictorAlgorithm(BaseAlgorithm):
    """Element-wise maximum of the outputs of the pool's fine-tuned models."""

    def run(self, modelpool: BaseModelPool) -> EnsembleCLIPVisionModel:
        models = [modelpool.load_model(name) for name in modelpool.model_names]
        return EnsembleCLIPVisionModel(models, mode="max", names=modelpool.model_names)
