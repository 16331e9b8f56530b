"""Simple averaging: ``θ = (1/T) Σ_i θ_i`` (θ0 not included).

Wortsman et al., *Model soups*, ICML 2022. https://arxiv.org/abs/2203.05482
Works without a ``_pretrained_`` model.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from fusion_bench.merge import stream_merge
from fusion_bench.merge.cores import pure_core
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import BaseModelPool

__all__ = ["simple_average_tensor", "simple_average", "SimpleAverageAlgorithm"]


def simple_average_tensor(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The mean of ``tensors``, summed in order."""
    total = torch.zeros_like(tensors[0])
    for t in tensors:
        total += t
    return total / len(tensors)


@pure_core(with_base=False)
def simple_average(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Average whole state dicts (the pure core)."""
    return {k: simple_average_tensor([sd[k] for sd in state_dicts]) for k in state_dicts[0]}


@register_algorithm("simple_average", core=simple_average)
class SimpleAverageAlgorithm(BaseAlgorithm):
    """Average the fine-tuned models of the pool."""

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        return stream_merge(
            modelpool, lambda key, base, thetas: simple_average_tensor(thetas), with_base=False, desc="simple average"
        )
