"""LiNeS (Layer-increasing Network Scaling) of a merged task vector: ``θ = θ0 + LiNeS(τ_MTL)``.

Wang et al., *LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging*,
ICLR 2025. https://arxiv.org/abs/2410.17146 (code: github.com/wang-kee/LiNeS, ``LiNeS_scaling`` in
``src/eval/eval.py``, multi-task vectors in ``src/eval/aggregation.py``).

The multi-task vector ``τ_MTL`` is task arithmetic's ``Σ_i τ_i`` (``merge: task_arithmetic``) or
TIES' merged vector (``merge: ties_merging``: whole-model trim to ``threshold`` percent, elected
signs, disjoint ``merge_func``; the LiNeS code uses ``k = 20`` and the disjoint **mean**). Each
tensor of encoder layer ``l`` (0-based, ``L`` layers, from keys ``encoder.layers.<l>.``) is scaled by

    λ(l) = α + β · l / (L − 1),

so the first layer keeps ``α`` and the last ``α + β``. As the official code, the multi-task ``α`` is
``‖Σ_i τ_i‖₁ / (T · ‖τ_MTL‖₁)`` (L1 norms over every floating tensor of the model), i.e. exactly
``1/T`` for task arithmetic; ``alpha`` overrides it. ``β`` is tuned on validation data in the paper
(over 0.1..1.0 for task arithmetic, 0.1..1.5 for TIES); no single value is published, so the
default ``beta = 0.5`` is a middle of that grid, not a reproduction.

Tensors outside the encoder layers: the official code scales every one of them (patch and position
embeddings, pre- and post-layernorm) by ``α``, the first layer's scale (``post_layernorm: first``,
the default). ``post_layernorm: last`` gives ``post_layernorm.*`` (which acts after the last layer)
the last layer's scale ``α + β`` instead. With ``L = 1`` every tensor gets ``α``.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.errors import ModelPoolError
from fusion_bench.merge import stream_merge
from fusion_bench.merge.tensors import sum_in_order
from fusion_bench.method._options import check_choice, check_range
from fusion_bench.merge.cores import pure_core
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.method.task_vector.core import (
    Aggregate,
    PoolTaskVectors,
    StateDictTaskVectors,
    TaskVectors,
    plan_pool,
)
from fusion_bench.method.task_vector.inner_step import check_inner_step, inner_aggregate
from fusion_bench.method.task_vector.ties_merging import check_ties_options
from fusion_bench.modelpool import BaseModelPool

__all__ = ["MERGES", "POST_LAYERNORM", "layer_index", "num_layers", "lines_scale", "lines", "LinesAlgorithm"]

StateDict = Mapping[str, Tensor]
MERGES: tuple[str, ...] = ("task_arithmetic", "ties_merging")  # canonical names (``ta`` / ``ties`` are accepted too)
POST_LAYERNORM: tuple[str, ...] = ("first", "last")
LAYER_KEY = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def layer_index(key: str) -> int | None:
    """The encoder layer of ``key`` (``...encoder.layers.<l>.…`` -> ``l``), None outside the layers."""
    match = LAYER_KEY.search(key)
    return int(match.group(1)) if match else None


def num_layers(keys: Iterable[str]) -> int:
    """``L``: one more than the largest layer index among ``keys`` (0 if none is in a layer)."""
    return 1 + max((i for i in map(layer_index, keys) if i is not None), default=-1)


def lines_scale(key: str, *, layers: int, alpha: float, beta: float, post_layernorm: str = "first") -> float:
    """``λ = α + β · l / (L − 1)`` for ``key`` (see the module docstring for non-layer tensors).

    Args:
        key: the tensor's name.
        layers: ``L``.
        alpha: α, the first layer's scale.
        beta: β, the last layer's scale minus the first's.
        post_layernorm: ``first`` (official code) or ``last``: the layer ``post_layernorm.*`` counts as.

    Returns:
        the scale of ``key``'s task vector.
    """
    index = layer_index(key)
    if index is None:
        index = layers - 1 if post_layernorm == "last" and "post_layernorm" in key else 0
    return alpha + beta * index / (layers - 1) if layers > 1 else alpha


def _auto_alpha(vectors: TaskVectors, aggregate: Aggregate, merge: str) -> float:
    """``‖Σ_i τ_i‖₁ / (T · ‖τ_MTL‖₁)`` over the whole model (``1/T`` for task arithmetic)."""
    count = len(vectors.plan.names)
    if merge == "task_arithmetic":  # the canonical name (check_inner_step)
        return 1.0 / count
    norm_sum = norm_mtl = 0.0
    for key, tvs in vectors.by_key():
        norm_sum += sum_in_order(tvs).abs().sum(dtype=torch.float64).item()
        norm_mtl += aggregate(key, tvs).abs().sum(dtype=torch.float64).item()
    return norm_sum / (count * norm_mtl) if norm_mtl > 0 else 1.0 / count


def _check_layers(keys: Sequence[str]) -> int:
    layers = num_layers(keys)
    if layers == 0:
        raise ModelPoolError(
            f"lines: no tensor name contains 'encoder.layers.<l>.' (keys: {list(keys)[:4]}...); "
            "LiNeS scales by encoder layer, so it needs a layered vision encoder such as CLIP's"
        )
    return layers


def _lines_tensor(key: str, base: Tensor, finetuned: Sequence[Tensor], aggregate: Aggregate, scale: float) -> Tensor:
    """``θ0 + λ(key) · τ_MTL[key]`` for one key."""
    return base + scale * aggregate(key, [theta - base for theta in finetuned])


@pure_core()
def lines(
    base: StateDict,
    finetuned: Sequence[StateDict],
    *,
    beta: float = 0.5,
    alpha: float | None = None,
    merge: str = "task_arithmetic",
    threshold: float = 20,
    merge_func: str = "mean",
    post_layernorm: str = "first",
) -> dict[str, Tensor]:
    """LiNeS over whole state dicts (the pure core; the streamed algorithm gives the same tensors).

    Args:
        base: θ0 (floating tensors only).
        finetuned: θ_1..θ_T in pool order.
        beta: β.
        alpha: α, or None for the official multi-task rule.
        merge: ``task_arithmetic`` or ``ties_merging`` (the multi-task vector).
        threshold: TIES: percent of each task vector kept by magnitude.
        merge_func: TIES' disjoint aggregation (``mean``, ``sum`` or ``max``).
        post_layernorm: ``first`` or ``last``.

    Returns:
        the merged state dict.
    """
    vectors = StateDictTaskVectors(base, finetuned)
    layers = _check_layers(vectors.plan.keys)
    merge = check_inner_step("lines", "merge", merge)
    density, merge_func = check_ties_options("lines", threshold, merge_func)
    aggregate = inner_aggregate(vectors, merge, density=density, merge_func=merge_func)
    alpha = _auto_alpha(vectors, aggregate, merge) if alpha is None else alpha
    return {
        k: _lines_tensor(
            k,
            base[k],
            [sd[k] for sd in finetuned],
            aggregate,
            lines_scale(k, layers=layers, alpha=alpha, beta=beta, post_layernorm=post_layernorm),
        )
        for k in base
    }


@register_algorithm("lines", core=lines)
class LinesAlgorithm(BaseAlgorithm):
    """LiNeS on task arithmetic's or TIES' multi-task vector, streamed (see the module docstring).

    Args:
        beta: β, the last layer's scale minus the first's (finite).
        alpha: α, the first layer's scale; None: ``‖Σ τ‖₁ / (T ‖τ_MTL‖₁)`` (official multi-task rule).
        merge: ``task_arithmetic`` (default) or ``ties_merging``.
        threshold: TIES only: percent of each task vector kept by magnitude, in (0, 100].
        merge_func: TIES only: ``mean`` (LiNeS code), ``sum`` or ``max``.
        post_layernorm: ``first`` (official code: α) or ``last`` (α + β).
    """

    def __init__(
        self,
        beta: float = 0.5,
        alpha: float | None = None,
        merge: str = "task_arithmetic",
        threshold: float = 20,
        merge_func: str = "mean",
        post_layernorm: str = "first",
    ) -> None:
        self.beta = check_range("lines", "beta", beta)
        self.alpha = None if alpha is None else check_range("lines", "alpha", alpha)
        self.merge = check_inner_step("lines", "merge", merge)
        self._density, self.merge_func = check_ties_options("lines", threshold, merge_func)
        self.threshold = float(threshold)
        self.post_layernorm = check_choice("lines", "post_layernorm", post_layernorm, POST_LAYERNORM)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        plan = plan_pool(modelpool)
        layers = _check_layers(plan.keys)
        vectors = PoolTaskVectors(modelpool, plan)
        aggregate = inner_aggregate(vectors, self.merge, density=self._density, merge_func=self.merge_func)
        alpha = _auto_alpha(vectors, aggregate, self.merge) if self.alpha is None else self.alpha
        scale = {
            k: lines_scale(k, layers=layers, alpha=alpha, beta=self.beta, post_layernorm=self.post_layernorm)
            for k in plan.keys
        }
        return stream_merge(
            modelpool,
            lambda key, base, thetas: _lines_tensor(key, base, thetas, aggregate, scale[key]),
            model_names=plan.names,
            desc="LiNeS",
            validated_keys=plan.all_keys,
        )
