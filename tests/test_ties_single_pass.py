"""TIES in two passes (thresholds, then merge + sign election) has the bits of the three-pass order."""

from __future__ import annotations

import pytest
import torch

from fusion_bench.method.task_vector.core import StateDictTaskVectors, family_core
from fusion_bench.method.task_vector.ties_merging import (
    PROVISIONAL_MAJORITY,
    TiesMergePass,
    ties_aggregate,
    ties_merging,
    ties_statistics,
)


def _three_pass(base, finetuned, *, density, merge_func, scaling_factor):
    """The order used before: thresholds, then the whole-model sign election, then the merge."""
    stats = ties_statistics(StateDictTaskVectors(base, finetuned), density)
    return family_core(base, finetuned, aggregate=ties_aggregate(stats, merge_func), scaling_factor=scaling_factor)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def _models(seed: int, lean: float, n_tasks: int = 5):
    """Small-integer task vectors (sums cancel exactly often), θ0 with +0.0 and -0.0 entries;
    ``lean`` shifts the task vectors so the whole-model majority is + (lean > 0) or - (lean < 0)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (7, 9), "a.bias": (9,), "b.weight": (4, 4, 3)}
    base = {}
    for k, shape in shapes.items():
        b = torch.randint(-2, 3, shape, generator=g).float() * 0.5
        b[b == 0] = torch.where(torch.rand(int((b == 0).sum()), generator=g) < 0.5, 0.0, -0.0)
        base[k] = b
    finetuned = []
    for _ in range(n_tasks):
        finetuned.append(
            {
                k: b
                + torch.randint(-3, 4, b.shape, generator=g).float()
                + lean * (torch.rand(b.shape, generator=g) < 0.3)
                for k, b in base.items()
            }
        )
    return base, finetuned


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("lean", [2.0, -2.0, 0.0])
@pytest.mark.parametrize("threshold", [20, 60, 100])
def test_same_bits_as_three_passes(merge_func, lean, threshold):
    base, finetuned = _models(seed=int(threshold + 10 * lean), lean=lean)
    expected = _three_pass(base, finetuned, density=threshold / 100, merge_func=merge_func, scaling_factor=0.3)
    got = ties_merging(base, finetuned, scaling_factor=0.3, threshold=threshold, merge_func=merge_func)
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(_bits(got[key]), _bits(expected[key])), key


def test_a_negative_majority_rewrites_the_cancelled_entries():
    base, finetuned = _models(seed=3, lean=-2.0)
    stats = ties_statistics(StateDictTaskVectors(base, finetuned), 0.6)
    assert stats.majority == -PROVISIONAL_MAJORITY  # the case where finish() has work to do
    merge = TiesMergePass(stats.thresholds, "sum", 0.3)
    merged = {k: merge(k, b, [sd[k] for sd in finetuned]) for k, b in base.items()}
    assert merge.majority == stats.majority and merge.pending  # some entries cancelled or had θ0 = ±0
    expected = _three_pass(base, finetuned, density=0.6, merge_func="sum", scaling_factor=0.3)
    assert any(not torch.equal(_bits(merged[k]), _bits(expected[k])) for k in expected)  # provisional ≠ final
    merge.finish(merged)
    for key in expected:
        assert torch.equal(_bits(merged[key]), _bits(expected[key])), key


def test_float64_and_a_cancelled_entry_by_hand():
    # one entry: τ = (+1, -1) cancels; majority over the model is -1 (the other entry: τ = (-1, -1))
    base = {"w": torch.tensor([0.5, 0.25], dtype=torch.float64)}
    finetuned = [
        {"w": base["w"] + torch.tensor([1.0, -1.0], dtype=torch.float64)},
        {"w": base["w"] + torch.tensor([-1.0, -1.0], dtype=torch.float64)},
    ]
    got = ties_merging(base, finetuned, scaling_factor=1.0, threshold=100)["w"]
    # elected sign (-1, -1): entry 0 keeps the -1 of task 2, entry 1 sums both
    assert got.tolist() == [0.5 - 1.0, 0.25 - 2.0]
