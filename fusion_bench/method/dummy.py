"""``dummy``: no fusion; returns the pre-trained model (or the first model if there is none).

Useful to evaluate one model of a pool: with the ``_individual`` pools it evaluates a single
fine-tuned expert, with ``taskpool=dummy`` it only reports the parameter counts.
"""

from __future__ import annotations

from torch import nn

from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool

__all__ = ["DummyAlgorithm"]


@register_algorithm("dummy")
class DummyAlgorithm(BaseAlgorithm):
    """Return ``_pretrained_`` if the pool has it, else its first model."""

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        return modelpool.load_pretrained_or_first_model()
