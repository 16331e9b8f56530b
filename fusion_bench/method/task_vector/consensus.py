"""Consensus merging with TALL masks (over task arithmetic or TIES).

Wang et al., *Localizing Task Information for Improved Model Merging and Compression*,
ICML 2024. https://arxiv.org/abs/2405.07813 (code: https://github.com/nik-dim/tall_masks)

Per tensor: ``τ_MTL`` = the multi-task vector (``Σ_t τ_t`` for ``aggregation: ta``, the TIES
merge for ``aggregation: ties``); the TALL mask of task t is ``m_t = |τ_t| ≥ λ_t |τ_MTL − τ_t|``;
the consensus mask keeps the weights selected by at least ``k`` masks (k = 2 removes both
"catastrophic" weights, used by no task, and "selfish" ones, used by one task); then
``θ = θ0 + α · (m_consensus ⊙ τ_MTL)``.

Defaults: ``consensus_k`` = 2 (paper and ``config/method/consensus.yaml`` of the authors'
code), ``tall_mask_lambda`` = 0.6 (FusionBench's ``config/method/tall_mask/task_arithmetic.yaml``;
the paper picks λ_t per task on validation data from {0.2, ..., 0.6}), ``scaling_factor`` =
0.3 (task arithmetic's), TIES variant ``threshold`` = 20 with ``merge_func: sum`` (the authors'
``ties_merging(..., reset_thresh=20, merge_func="dis-sum")``). The mask uses ``≥`` as
the paper (docs/algorithms.md); the authors' code uses ``>`` (they differ only on exact ties).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.errors import ConfigError
from fusion_bench.method.task_vector.core import (
    Aggregate,
    PoolTaskVectors,
    StateDictTaskVectors,
    family_core,
    family_merge,
    plan_pool,
)
from fusion_bench.method._options import check_int, check_number_list, check_range
from fusion_bench.merge.cores import pure_core
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.method.task_vector.inner_step import check_inner_step, inner_aggregate
from fusion_bench.method.task_vector.ties_merging import MergeFunc, check_ties_options
from fusion_bench.modelpool import BaseModelPool

__all__ = ["tall_mask", "consensus_mask", "consensus_aggregate", "consensus_merging", "ConsensusMergingAlgorithm"]

StateDict = Mapping[str, torch.Tensor]
NAME = "consensus_merging"


# ---- the masks -----------------------------------------------------------------


def tall_mask(tv: Tensor, tv_mtl: Tensor, lam: float) -> Tensor:
    """TALL mask of one task: ``|τ_t| ≥ λ_t · |τ_MTL − τ_t|`` (same shape, boolean).

    Wang et al., *Localizing Task Information for Improved Model Merging and Compression*,
    ICML 2024. https://arxiv.org/abs/2405.07813
    """
    return tv.abs() >= lam * (tv_mtl - tv).abs()


def consensus_mask(masks: Sequence[Tensor], k: int) -> Tensor:
    """Keep the weights selected by at least ``k`` of the task masks (boolean, same shape)."""
    count = torch.zeros(masks[0].shape, dtype=torch.int64, device=masks[0].device)
    for m in masks:
        count += m
    return count >= k


def consensus_aggregate(
    inner: Aggregate, lambdas: Sequence[float], k: int, counts: dict[str, Any] | None = None
) -> Aggregate:
    """Wrap ``inner`` (TA or TIES): keep ``τ_MTL`` only where ≥ ``k`` TALL masks agree.

    Args:
        inner: builds the multi-task vector ``τ_MTL`` of one key.
        lambdas: ``λ_t`` per task.
        k: the consensus threshold.
        counts: if given, accumulates ``numel``, ``tall`` (per task) and ``consensus`` counts.
    """

    def aggregate(key: str, tvs: list[torch.Tensor]) -> torch.Tensor:
        merged = inner(key, tvs)  # τ_MTL, same shape as each τ_t
        masks = [tall_mask(tv, merged, lam) for tv, lam in zip(tvs, lambdas)]
        keep = consensus_mask(masks, k)
        if counts is not None:
            counts["numel"] += keep.numel()
            counts["tall"] = [c + int(m.sum()) for c, m in zip(counts["tall"], masks)]
            counts["consensus"] += int(keep.sum())
        return torch.where(keep, merged, 0.0)

    return aggregate


def tall_mask_lambdas(value: float | Sequence[float], names: Sequence[str], method: str = NAME) -> list[float]:
    """The TALL-mask λ of each fine-tuned model: one number for all, or one per model in pool order.

    Raises:
        ConfigError: a list whose length is not the number of models (``method`` names the method in the message).
    """
    if isinstance(value, (int, float)):
        return [float(value)] * len(names)
    if len(value) != len(names):
        raise ConfigError(
            f"{method}: option 'tall_mask_lambda' has {len(value)} entries but the pool has {len(names)} fine-tuned "
            f"models {list(names)}; give one number, or one per model in pool order"
        )
    return [float(v) for v in value]


@pure_core()
def consensus_merging(
    base: StateDict,
    finetuned: Sequence[StateDict],
    *,
    scaling_factor: float = 0.3,
    tall_mask_lambda: float | list[float] = 0.6,
    consensus_k: int = 2,
    aggregation: str = "ta",
    threshold: float = 20,
    merge_func: MergeFunc = "sum",
) -> dict[str, torch.Tensor]:
    """Consensus merging over whole state dicts (the pure core; see the module docstring).

    Returns:
        ``θ0 + α · (m_consensus ⊙ τ_MTL)``.
    """
    density, merge_func = check_ties_options(NAME, threshold, merge_func)
    inner = inner_aggregate(
        StateDictTaskVectors(base, finetuned),
        check_inner_step(NAME, "aggregation", aggregation),
        density=density,
        merge_func=merge_func,
    )
    lambdas = tall_mask_lambdas(tall_mask_lambda, [str(i) for i in range(len(finetuned))])
    return family_core(
        base, finetuned, aggregate=consensus_aggregate(inner, lambdas, consensus_k), scaling_factor=scaling_factor
    )


@register_algorithm("consensus_merging", core=consensus_merging)
class ConsensusMergingAlgorithm(BaseAlgorithm):
    """Consensus merging (TALL masks), streamed.

    Args:
        scaling_factor: α, the weight of the masked multi-task vector.
        tall_mask_lambda: λ_t of the TALL masks: one number, or one per model in pool order.
        consensus_k: keep weights selected by at least this many task masks.
        aggregation: ``ta`` / ``task_arithmetic`` (τ_MTL = Σ τ_t) or ``ties`` / ``ties_merging`` (the TIES merge).
        threshold: TIES' percent kept (``aggregation: ties`` only), in (0, 100].
        merge_func: TIES' aggregation (``aggregation: ties`` only).
    """

    def __init__(
        self,
        scaling_factor: float = 0.3,
        tall_mask_lambda: float | list[float] = 0.6,
        consensus_k: int = 2,
        aggregation: str = "ta",
        threshold: float = 20,
        merge_func: str = "sum",
    ) -> None:
        self.scaling_factor = check_range(NAME, "scaling_factor", scaling_factor)
        if isinstance(tall_mask_lambda, (int, float)) and not isinstance(tall_mask_lambda, bool):
            self.tall_mask_lambda: float | list[float] = check_range(NAME, "tall_mask_lambda", tall_mask_lambda, low=0)
        else:
            self.tall_mask_lambda = [
                check_range(NAME, "tall_mask_lambda", v, low=0)
                for v in check_number_list(NAME, "tall_mask_lambda", tall_mask_lambda)
            ]
        self.consensus_k = check_int(NAME, "consensus_k", consensus_k, low=0)
        self._inner = check_inner_step(NAME, "aggregation", aggregation)
        self.aggregation = aggregation
        self._density, self.merge_func = check_ties_options(NAME, threshold, merge_func)
        self.threshold = float(threshold)
        self._report: dict[str, Any] = {}

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        plan = plan_pool(modelpool, min_models=max(1, self.consensus_k))
        lambdas = tall_mask_lambdas(self.tall_mask_lambda, plan.names)
        inner = inner_aggregate(
            PoolTaskVectors(modelpool, plan), self._inner, density=self._density, merge_func=self.merge_func
        )
        counts: dict[str, Any] = {"numel": 0, "tall": [0] * len(plan.names), "consensus": 0}
        model = family_merge(
            modelpool,
            plan,
            aggregate=consensus_aggregate(inner, lambdas, self.consensus_k, counts),
            scaling_factor=self.scaling_factor,
            desc="consensus merging",
        )
        total = max(counts["numel"], 1)
        self._report = {
            "consensus_merging": {
                "tall_mask_density": {n: c / total for n, c in zip(plan.names, counts["tall"])},
                "consensus_mask_density": counts["consensus"] / total,
            }
        }
        return model

    def extra_report(self) -> dict[str, Any]:
        """The density of each task's TALL mask and of the consensus mask (fractions of weights)."""
        return dict(self._report)
