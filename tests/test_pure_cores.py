"""The contract of every registered pure core, and of the per-key aggregates the streamed merges share.

Every core listed in ``fusion_bench.method.CORES`` gets cloned-and-compared inputs: after the call the
inputs hold the same bits (values and dtypes); non-floating tensors come back as copies; half-precision
inputs are upcast once (the result equals the core on float32 copies of the inputs, bit for bit).
"""

from __future__ import annotations

import inspect

import pytest
import torch

from fusion_bench.method import CORES
from fusion_bench.method.task_vector.consensus import consensus_aggregate
from fusion_bench.method.task_vector.core import StateDictTaskVectors, sum_aggregate, task_arithmetic_tensor
from fusion_bench.method.task_vector.pcb_merging import pcb_merge_tensor, pcb_statistics
from fusion_bench.method.task_vector.ties_merging import (
    disjoint_merge,
    ties_elect_sign,
    ties_merge_tensor,
    ties_statistics,
)

SHAPES = {
    "embeddings.weight": (4, 3),
    "encoder.layers.0.fc.weight": (4, 4),
    "encoder.layers.0.fc.bias": (4,),
    "encoder.layers.1.fc.weight": (4, 4),
    "post_layernorm.weight": (4,),
}


def state_dicts(dtype: torch.dtype, count: int = 3) -> list[dict[str, torch.Tensor]]:
    """θ0 then ``count`` fine-tuned models (θ0 + noise), plus an int64 ``position_ids`` in each."""
    gen = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    models = [base] + [
        {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items()} for _ in range(count)
    ]
    return [{**{k: v.to(dtype) for k, v in sd.items()}, "position_ids": torch.arange(4).unsqueeze(0)} for sd in models]


def call(name: str, models: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    core = CORES[name]
    if next(iter(inspect.signature(core).parameters)) == "base":
        return core(models[0], models[1:])
    return core(models[1:])


def clones(models: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in sd.items()} for sd in models]


def assert_unchanged(models: list[dict[str, torch.Tensor]], snapshot: list[dict[str, torch.Tensor]]) -> None:
    for sd, before in zip(models, snapshot):
        for key, value in before.items():
            assert sd[key].dtype == value.dtype and torch.equal(sd[key], value), key


def test_every_data_free_method_has_a_registered_core():
    data_free = {"consensus_merging", "dare_task_arithmetic", "dare_ties_merging", "iso_c", "iso_cts", "lines"}
    data_free |= {
        "model_breadcrumbs",
        "model_stock",
        "pcb_merging",
        "simple_average",
        "task_arithmetic",
        "ties_merging",
    }
    data_free |= {"tsv_merging", "weighted_average", "wudi_merging", "magmax"}
    assert set(CORES) == data_free


@pytest.mark.parametrize("name", sorted(CORES))
def test_a_core_never_mutates_copies_non_floats_and_upcasts_once(name):
    models = state_dicts(torch.float32)
    snapshot = clones(models)
    merged = call(name, models)
    assert_unchanged(models, snapshot)
    assert list(merged) == list(models[0])  # every key, in θ0's order
    ids = merged["position_ids"]
    assert torch.equal(ids, models[0]["position_ids"])
    assert all(ids.data_ptr() != sd["position_ids"].data_ptr() for sd in models)  # a copy, not the input
    ids.add_(1)
    assert_unchanged(models, snapshot)

    half = state_dicts(torch.float16)
    half_snapshot = clones(half)
    merged_half = call(name, half)
    assert_unchanged(half, half_snapshot)
    upcast = call(name, [{k: v.float() if v.is_floating_point() else v for k, v in sd.items()} for sd in half])
    for key, value in merged_half.items():
        if value.is_floating_point():
            assert value.dtype == torch.float32 and torch.equal(value, upcast[key]), key


def per_key_aggregates(models: list[dict[str, torch.Tensor]]) -> dict[str, object]:
    """The per-key steps the streamed merges call on one key's task vectors."""
    base, finetuned = models[0], models[1:]
    floats = [{k: v for k, v in sd.items() if v.is_floating_point()} for sd in models]
    vectors = StateDictTaskVectors(floats[0], floats[1:])
    ties = ties_statistics(vectors, 0.4)
    pcb = pcb_statistics(vectors, pcb_ratio=0.4, min_ratio=1e-4, max_ratio=1e-4)
    return {
        "ties_merge_tensor": lambda key, tvs: ties_merge_tensor(tvs, ties, "sum"),
        "ties_elect_sign+disjoint_merge": lambda key, tvs: disjoint_merge(tvs, ties_elect_sign(tvs), "mean"),
        "consensus(ta)": consensus_aggregate(sum_aggregate, [0.6] * len(finetuned), 2),
        "consensus(ties)": consensus_aggregate(
            lambda k, tvs: ties_merge_tensor(tvs, ties, "sum"), [0.6] * len(finetuned), 2
        ),
        "pcb_merge_tensor": lambda key, tvs: pcb_merge_tensor(tvs, pcb),
        "task_arithmetic_tensor": lambda key, tvs: task_arithmetic_tensor(base[key], tvs, scaling_factor=0.3),
    }


@pytest.mark.parametrize("step", list(per_key_aggregates(state_dicts(torch.float32))))
def test_per_key_steps_leave_the_task_vectors_untouched(step):
    models = state_dicts(torch.float32)
    aggregate = per_key_aggregates(models)[step]
    for key in SHAPES:
        tvs = [sd[key] - models[0][key] for sd in models[1:]]
        before = [tv.clone() for tv in tvs]
        aggregate(key, tvs)
        assert all(torch.equal(tv, b) for tv, b in zip(tvs, before)), key


SPELLINGS = [("ta", "task_arithmetic"), ("ties", "ties_merging")]


@pytest.mark.parametrize("core, option", [("consensus_merging", "aggregation"), ("lines", "merge")])
def test_one_inner_step_chooser_takes_both_spellings(core, option):
    models = state_dicts(torch.float32)
    results = {}
    for short, long in SPELLINGS:
        a = CORES[core](models[0], models[1:], **{option: short})
        b = CORES[core](models[0], models[1:], **{option: long})
        assert all(torch.equal(a[k], b[k]) for k in a)
        results[long] = a
    key = "encoder.layers.0.fc.weight"
    assert not torch.equal(results["task_arithmetic"][key], results["ties_merging"][key])
