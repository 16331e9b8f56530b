"""EMR-Merging (Elect, Mask & Rescale): one unified task vector + a mask and a rescaler per task.

Huang et al., *EMR-Merging: Tuning-Free High-Performance Model Merging*, NeurIPS 2024.
https://arxiv.org/abs/2405.17461 (code: https://github.com/harveyhuang18/EMR_Merging)

Per tensor: the elected sign ``γ = sign(Σ_t τ_t)`` (a zero sum counts as negative, as the authors' code); the
unified vector ``τ_uni = γ ⊙ max_t |m_t ⊙ τ_t|`` with the task masks ``m_t = (τ_t ⊙ γ > 0)``. Per task, the
rescaler ``λ_t = Σ_k mean|τ_t[k]| / Σ_k mean|m_t[k] ⊙ τ_uni[k]|`` (sums over the tensors k of the per-tensor
mean magnitudes, in float32 in the model's parameter order, as the authors' code). The model for task t is
``θ0 + λ_t · (m_t ⊙ τ_uni)``, so the result needs the task at inference
(:mod:`fusion_bench.models.task_conditioned`); the CLIP task pool evaluates each task with its own mask and
rescaler, so the pool's model names must be the task pool's task names. No hyperparameters (the method is
tuning-free; the reference FusionBench ``config/method/emr_merging/emr_merging.yaml`` has no options).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from fusion_bench.errors import ConfigError
from fusion_bench.merge.tensors import sum_in_order
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.method.task_vector.core import PoolTaskVectors, plan_pool
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.modelpool.base_pool import PRETRAINED
from fusion_bench.models.task_conditioned import MaskedTaskVectorModel

__all__ = ["elect_sign", "emr_elect", "emr_rescalers", "MagnitudeSums", "emr_state_dicts", "EMRMergingAlgorithm"]

NAME = "emr_merging"


def elect_sign(tvs: Sequence[Tensor]) -> Tensor:
    """``γ = sign(Σ_t τ_t)`` with a zero sum counted as −1 (values ±1, the task vectors' dtype)."""
    total = sum_in_order(list(tvs))
    return torch.where(total > 0, 1.0, -1.0).to(total.dtype)


def emr_elect(tvs: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """``(τ_uni, [m_t])`` of one tensor (module docstring)."""
    flag = elect_sign(tvs)
    masks = [tv * flag > 0 for tv in tvs]
    magnitude = torch.zeros_like(tvs[0])
    for tv, m in zip(tvs, masks):
        magnitude = torch.maximum(magnitude, (tv * m).abs())
    return magnitude * flag, masks


def emr_rescalers(old: Tensor, new: Tensor, names: Sequence[str]) -> list[float]:
    """``λ_t = old_t / new_t`` (the summed per-tensor mean magnitudes of τ_t and of m_t ⊙ τ_uni).

    Raises:
        ConfigError: a model whose masked unified vector is all zero (its model equals θ0 and no
            rescaler exists), naming it.
    """
    for name, value in zip(names, new.tolist()):
        if value == 0:
            raise ConfigError(
                f"{NAME}: model {name!r}: its mask keeps no non-zero entry of the unified vector (is it equal to "
                "the pre-trained model?); remove it from the pool"
            )
    return (old / new).tolist()


class MagnitudeSums:
    """Per task, the sums over tensors of ``mean|τ_t|`` and ``mean|m_t ⊙ τ_uni|``.

    The per-tensor means are kept and summed at the end in float32 in the order given (the model's own
    parameter order, as the authors' ``torch.zeros(T)`` accumulators over the state dict), so the rescalers
    equal theirs bit for bit whatever order the tensors were read in.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self.old: dict[str, list[Tensor]] = {}
        self.new: dict[str, list[Tensor]] = {}

    def add(self, key: str, tvs: Sequence[Tensor], unified: Tensor, masks: Sequence[Tensor]) -> None:
        self.old[key] = [tv.abs().mean().float() for tv in tvs]
        self.new[key] = [(unified * m).abs().mean().float() for m in masks]

    def totals(self, order: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(old, new)`` summed over the keys in ``order`` (then any others, sorted)."""
        keys = [k for k in order if k in self.old] + sorted(set(self.old) - set(order))
        old, new = torch.zeros(self.n), torch.zeros(self.n)
        for key in keys:
            for t in range(self.n):
                old[t] += self.old[key][t]
                new[t] += self.new[key][t]
        return old, new


def emr_state_dicts(base: Mapping[str, Tensor], finetuned: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """Each task's model ``θ0 + λ_t · (m_t ⊙ τ_uni)`` from whole state dicts (floating tensors; in memory)."""
    keys = sorted(k for k, v in base.items() if v.is_floating_point())
    acc = MagnitudeSums(len(finetuned))
    parts = {}
    for key in keys:
        tvs = [sd[key] - base[key] for sd in finetuned]
        unified, masks = emr_elect(tvs)
        acc.add(key, tvs, unified, masks)
        parts[key] = (unified, masks)
    scales = emr_rescalers(*acc.totals(list(base)), [str(t) for t in range(len(finetuned))])
    return [{k: base[k] + parts[k][0] * parts[k][1][t] * scales[t] for k in keys} for t in range(len(finetuned))]


@register_algorithm(NAME)
class EMRMergingAlgorithm(BaseAlgorithm):
    """EMR-Merging: a unified task vector with per-task masks and rescalers (evaluated with the task known)."""

    needs_task_at_inference = True  # the program checks the task pool's tasks before merging

    def run(self, modelpool: BaseModelPool) -> MaskedTaskVectorModel:
        plan = plan_pool(modelpool)
        base_source = modelpool.tensor_source(PRETRAINED)
        acc = MagnitudeSums(len(plan.names))
        base, vector, masks = {}, {}, {name: {} for name in plan.names}
        for key, tvs in PoolTaskVectors(modelpool, plan).by_key():
            unified, key_masks = emr_elect(tvs)
            acc.add(key, tvs, unified, key_masks)
            vector[key] = unified
            base[key] = base_source.get(key).to(unified.dtype)
            for name, m in zip(plan.names, key_masks):
                masks[name][key] = m
        backbone = modelpool.load_model(PRETRAINED)
        order = [name for name, _ in backbone.named_parameters()]
        self._rescalers = dict(zip(plan.names, emr_rescalers(*acc.totals(order), plan.names)))
        return MaskedTaskVectorModel(backbone, base, vector, masks, self._rescalers)

    def extra_report(self) -> dict:
        return {"emr_rescalers": dict(getattr(self, "_rescalers", {}))}
