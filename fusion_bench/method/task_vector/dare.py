"""DARE (drop and rescale) before task arithmetic or TIES.

Yu et al., *Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch*, ICML 2024. https://arxiv.org/abs/2311.03099

Each task vector tensor becomes ``τ ⊙ m / (1 − p)`` with ``m ~ Bernoulli(1 − p)`` (kept where a
``U[0, 1)`` draw is ``≥ p``), then the family's aggregate runs on the dropped vectors:

* ``dare_task_arithmetic``: ``θ0 + λ Σ_t τ'_t``; reference defaults (FusionBench
  ``config/method/dare/task_arithmetic.yaml``) λ = 0.3, ``sparsity_ratio`` p = 0.5, rescale on.
* ``dare_ties_merging``: TIES (whole-model trimming, see :mod:`.ties_merging`) on the dropped
  vectors; reference defaults (``config/method/dare/ties_merging.yaml``) λ = 0.5, p = 0.5,
  ``threshold`` = 20, ``merge_func`` = sum.

Unlike the reference (``torch.rand_like`` on the global RNG), the draws are seeded: each
(task index, tensor key) pair has its own ``torch.Generator`` derived from ``seed``, so a merge
is bitwise reproducible and independent of the order tensors are visited in.
``only_on_linear_weights`` drops only the weights of ``nn.Linear`` layers (reference option).
"""

from __future__ import annotations

import hashlib
from typing import AbstractSet, Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.method.task_vector.core import (
    TaskVectorTransform,
    family_core,
    plan_pool,
    sum_aggregate,
)
from fusion_bench.method._options import check_bool, check_int, check_range
from fusion_bench.merge.cores import pure_core
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.method.task_vector.task_arithmetic import task_arithmetic_merge
from fusion_bench.method.task_vector.ties_merging import (
    MergeFunc,
    check_ties_options,
    ties_single_pass_core,
    ties_stream_merge,
)
from fusion_bench.modelpool import BaseModelPool

__all__ = [
    "dare_generator",
    "dare_drop",
    "dare_transform",
    "dare_task_arithmetic",
    "dare_ties_merging",
    "DareTaskArithmeticAlgorithm",
    "DareTiesMergingAlgorithm",
]

StateDict = Mapping[str, torch.Tensor]


# ---- the drop --------------------------------------------------------------------------------


def dare_generator(seed: int, task_index: int, key: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, task_index, key)`` by a stable hash.

    Every (task, tensor) pair gets its own stream, so a drop mask does not depend on the order
    in which tensors are visited (streamed passes and in-memory cores draw the same masks).
    """
    digest = hashlib.blake2b(f"{seed}\0{task_index}\0{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def dare_drop(tv: Tensor, p: float, generator: torch.Generator, *, rescale: bool = True) -> Tensor:
    """DARE: keep each entry with probability ``1 − p`` and rescale by ``1 / (1 − p)``.

    Yu et al., *Language Models are Super Mario*, 2023. https://arxiv.org/abs/2311.03099

    Args:
        tv: a task vector tensor, any shape.
        p: the drop rate, in ``[0, 1)``.
        generator: the CPU generator the ``U[0, 1)`` draws come from (float32, one per entry).
        rescale: divide the kept entries by ``1 − p`` (DARE's default).

    Returns:
        ``tv ⊙ m / (1 − p)`` with ``m = [u ≥ p]``; bitwise deterministic given the generator.
    """
    u = torch.rand(tv.shape, generator=generator, dtype=torch.float32)  # same shape as tv
    dropped = torch.where((u >= p).to(tv.device), tv, 0.0)
    return dropped / (1.0 - p) if rescale else dropped


# ---- the family transform and the algorithms -------------------------------------------


def dare_transform(
    sparsity_ratio: float, seed: int, *, rescale: bool = True, keys: AbstractSet[str] | None = None
) -> TaskVectorTransform:
    """The family transform ``(t, key, τ) -> DARE(τ)`` with the generator of ``(seed, t, key)``.

    Args:
        sparsity_ratio: the drop rate p, in [0, 1).
        seed: the base seed.
        rescale: divide kept entries by ``1 − p``.
        keys: drop only in these tensors (others pass unchanged); None: every tensor.
    """

    def transform(index: int, key: str, tv: torch.Tensor) -> torch.Tensor:
        if keys is not None and key not in keys:
            return tv
        return dare_drop(tv, sparsity_ratio, dare_generator(seed, index, key), rescale=rescale)

    return transform


@pure_core()
def dare_task_arithmetic(
    base: StateDict,
    finetuned: Sequence[StateDict],
    *,
    scaling_factor: float = 0.3,
    sparsity_ratio: float = 0.5,
    seed: int = 42,
    rescale: bool = True,
) -> dict[str, torch.Tensor]:
    """DARE + task arithmetic over whole state dicts (the pure core).

    Returns:
        ``θ0 + λ Σ_t DARE(τ_t)``.
    """
    transform = dare_transform(sparsity_ratio, seed, rescale=rescale)
    return family_core(base, finetuned, aggregate=sum_aggregate, scaling_factor=scaling_factor, transform=transform)


@pure_core()
def dare_ties_merging(
    base: StateDict,
    finetuned: Sequence[StateDict],
    *,
    scaling_factor: float = 0.5,
    sparsity_ratio: float = 0.5,
    seed: int = 42,
    rescale: bool = True,
    threshold: float = 20,
    merge_func: MergeFunc = "sum",
) -> dict[str, torch.Tensor]:
    """DARE + TIES over whole state dicts (the pure core).

    Returns:
        ``θ0 + λ · TIES(DARE(τ_1), ..., DARE(τ_T))``.
    """
    density, merge_func = check_ties_options("dare_ties_merging", threshold, merge_func)
    transform = dare_transform(sparsity_ratio, seed, rescale=rescale)
    return ties_single_pass_core(
        base, finetuned, density=density, merge_func=merge_func, scaling_factor=scaling_factor, transform=transform
    )


def linear_weight_keys(modelpool: BaseModelPool) -> frozenset[str]:
    """The pool's keys (canonical layout) of the ``weight`` of every ``nn.Linear`` in θ0."""
    model = modelpool.load_pretrained_model()
    pointers = {m.weight.data_ptr() for m in model.modules() if isinstance(m, nn.Linear)}
    return frozenset(k for k, t in modelpool.canonical_state_dict(model).items() if t.data_ptr() in pointers)


class _DareOptions(BaseAlgorithm):
    """The options both DARE variants share (validated here, at construction).

    Args:
        scaling_factor: λ.
        sparsity_ratio: drop rate p in [0, 1).
        rescale: divide kept entries by ``1 − p``.
        only_on_linear_weights: drop only in ``nn.Linear`` weights.
        seed: base seed of the drop masks.
    """

    def __init__(
        self, scaling_factor: float, sparsity_ratio: float, rescale: bool, only_on_linear_weights: bool, seed: int
    ) -> None:
        self.scaling_factor = check_range(self.name, "scaling_factor", scaling_factor)
        self.sparsity_ratio = check_range(
            self.name,
            "sparsity_ratio",
            sparsity_ratio,
            low=0,
            high=1,
            high_open=True,
            hint=" (the probability of dropping each entry)",
        )
        self.rescale = check_bool(self.name, "rescale", rescale)
        self.only_on_linear_weights = check_bool(self.name, "only_on_linear_weights", only_on_linear_weights)
        self.seed = check_int(self.name, "seed", seed)

    def _transform(self, modelpool: BaseModelPool) -> TaskVectorTransform:
        keys = linear_weight_keys(modelpool) if self.only_on_linear_weights else None
        return dare_transform(self.sparsity_ratio, self.seed, rescale=self.rescale, keys=keys)


@register_algorithm("dare_task_arithmetic", core=dare_task_arithmetic)
class DareTaskArithmeticAlgorithm(_DareOptions):
    """DARE + task arithmetic, streamed.

    Args:
        scaling_factor, sparsity_ratio, rescale, only_on_linear_weights, seed: see :class:`_DareOptions`.
    """

    def __init__(
        self,
        scaling_factor: float = 0.3,
        sparsity_ratio: float = 0.5,
        rescale: bool = True,
        only_on_linear_weights: bool = False,
        seed: int = 42,
    ) -> None:
        super().__init__(scaling_factor, sparsity_ratio, rescale, only_on_linear_weights, seed)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        plan = plan_pool(modelpool)
        return task_arithmetic_merge(
            modelpool,
            plan,
            scaling_factor=self.scaling_factor,
            transform=self._transform(modelpool),
            desc="DARE task arithmetic",
        )


@register_algorithm("dare_ties_merging", core=dare_ties_merging)
class DareTiesMergingAlgorithm(_DareOptions):
    """DARE + TIES, streamed (whole-model TIES statistics over the dropped task vectors).

    Args:
        scaling_factor, sparsity_ratio, rescale, only_on_linear_weights, seed: see :class:`_DareOptions`.
        threshold: TIES' percent kept by magnitude, in (0, 100].
        merge_func: ``sum`` (reference), ``mean`` (TIES paper) or ``max``.
    """

    def __init__(
        self,
        scaling_factor: float = 0.5,
        sparsity_ratio: float = 0.5,
        rescale: bool = True,
        only_on_linear_weights: bool = False,
        seed: int = 42,
        threshold: float = 20,
        merge_func: str = "sum",
    ) -> None:
        super().__init__(scaling_factor, sparsity_ratio, rescale, only_on_linear_weights, seed)
        self._density, self.merge_func = check_ties_options(self.name, threshold, merge_func)
        self.threshold = float(threshold)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        plan = plan_pool(modelpool)
        transform = self._transform(modelpool)
        return ties_stream_merge(
            modelpool,
            plan,
            density=self._density,
            merge_func=self.merge_func,  # type: ignore[arg-type]
            scaling_factor=self.scaling_factor,
            transform=transform,
            desc="DARE TIES",
        )
