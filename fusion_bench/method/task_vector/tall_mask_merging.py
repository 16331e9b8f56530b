"""TALL masks with the task known at inference: one masked multi-task model per task.

Wang et al., *Localizing Task Information for Improved Model Merging and Compression*, ICML 2024.
https://arxiv.org/abs/2405.07813 (code: https://github.com/nik-dim/tall_masks)

``τ_MTL = Σ_t τ_t``; the TALL mask of task t is ``m_t = |τ_t| ≥ λ · |τ_MTL − τ_t|`` (per entry); the model
for task t is ``θ0 + m_t ⊙ τ_MTL`` (τ_MTL not scaled), which recovers most of the expert's accuracy from
one shared vector plus one bit per weight and task. The result needs the task at inference
(:mod:`fusion_bench.models.task_conditioned`): the CLIP task pool evaluates each task with its own mask,
so the pool's model names must be the task pool's task names. Default ``tall_mask_lambda`` = 0.6 (the
reference FusionBench ``config/method/tall_mask/task_arithmetic.yaml``; the paper picks λ per task on
validation data from {0.2, ..., 0.6}). The mask is computed with ``≥`` as the paper writes it; the authors'
code uses ``>``, which differs only where both sides are equal.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from torch import Tensor

from fusion_bench.merge.tensors import sum_in_order
from fusion_bench.method._options import check_range
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.method.task_vector.consensus import tall_mask, tall_mask_lambdas
from fusion_bench.method.task_vector.core import PoolTaskVectors, plan_pool
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.modelpool.base_pool import PRETRAINED
from fusion_bench.models.task_conditioned import MaskedTaskVectorModel

__all__ = ["tall_mask_parts", "tall_mask_state_dicts", "TallMaskAlgorithm"]

NAME = "tall_mask"


def tall_mask_parts(tvs: Sequence[Tensor], lambdas: Sequence[float]) -> tuple[Tensor, list[Tensor]]:
    """``(τ_MTL, [m_t])`` of one tensor: the summed task vector and each task's TALL mask."""
    merged = sum_in_order(list(tvs))
    return merged, [tall_mask(tv, merged, lam) for tv, lam in zip(tvs, lambdas)]


@register_algorithm(NAME)
class TallMaskAlgorithm(BaseAlgorithm):
    """Per-task TALL-masked multi-task models (evaluated with the task known).

    Args:
        tall_mask_lambda: λ of the masks: one number, or one per model in pool order (each ≥ 0).
    """

    needs_task_at_inference = True  # the program checks the task pool's tasks before merging

    def __init__(self, tall_mask_lambda: float | list[float] = 0.6) -> None:
        values = [tall_mask_lambda] if isinstance(tall_mask_lambda, (int, float)) else list(tall_mask_lambda)
        for i, v in enumerate(values):
            check_range(NAME, "tall_mask_lambda" if len(values) == 1 else f"tall_mask_lambda[{i}]", v, low=0)
        self.tall_mask_lambda = tall_mask_lambda if isinstance(tall_mask_lambda, (int, float)) else values

    def run(self, modelpool: BaseModelPool) -> MaskedTaskVectorModel:
        plan = plan_pool(modelpool)
        lambdas = tall_mask_lambdas(self.tall_mask_lambda, plan.names, NAME)
        base_source = modelpool.tensor_source(PRETRAINED)
        base, vector, masks = {}, {}, {name: {} for name in plan.names}
        for key, tvs in PoolTaskVectors(modelpool, plan).by_key():
            vector[key], key_masks = tall_mask_parts(tvs, lambdas)
            base[key] = base_source.get(key).to(vector[key].dtype)
            for name, m in zip(plan.names, key_masks):
                masks[name][key] = m
        backbone = modelpool.load_model(PRETRAINED)
        model = MaskedTaskVectorModel(backbone, base, vector, masks, {name: 1.0 for name in plan.names})
        self._density = model.mask_density()
        return model

    def extra_report(self) -> dict:
        return {"tall_mask_density": dict(getattr(self, "_density", {}))}


def tall_mask_state_dicts(
    base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]], *, tall_mask_lambda: float = 0.6
) -> list[dict[str, Tensor]]:
    """Each task's model ``θ0 + m_t ⊙ τ_MTL`` from whole state dicts (floating tensors; in memory)."""
    lambdas = [float(tall_mask_lambda)] * len(finetuned)
    out: list[dict[str, Tensor]] = [{} for _ in finetuned]
    for key, b in base.items():
        if not b.is_floating_point():
            continue
        merged, key_masks = tall_mask_parts([sd[key] - b for sd in finetuned], lambdas)
        for t, m in enumerate(key_masks):
            out[t][key] = b + merged * m * 1.0
    return out
