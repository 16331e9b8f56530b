"""The streaming merge engine: exact values, equality with the in-memory cores, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fusion_bench.errors import IncompatibleModelsError, ModelPoolError
from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm
from fusion_bench.method.averaging.simple_average import simple_average
from fusion_bench.method.task_vector.task_arithmetic import task_arithmetic
from fusion_bench.modelpool import BaseModelPool, CLIPVisionModelPool
from fusion_bench.models.hf_clip import vision_state_dict


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


BASE = linear([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [0, 0, 0])
A = linear([[2, 2, 3], [4, 3, 6], [7, 8, 9]], [1, 0, 0])  # τA: +1 at (0,0), −2 at (1,1); bias +1 at 0
B = linear([[1, 2, 3], [4, 7, 6], [7, 8, 5]], [0, 0, -2])  # τB: +2 at (1,1), −4 at (2,2); bias −2 at 2


def small_pool(**extra: nn.Module) -> BaseModelPool:
    return BaseModelPool({"_pretrained_": BASE, "a": A, "b": B, **extra})


def test_task_arithmetic_exact_values():
    merged = TaskArithmeticAlgorithm(scaling_factor=0.5).run(small_pool())
    # θ0 + 0.5 (τA + τB): (0,0) 1 + 0.5; (1,1) 5 + 0.5 (−2 + 2) = 5; (2,2) 9 − 2 = 7
    assert merged.weight.tolist() == [[1.5, 2, 3], [4, 5, 6], [7, 8, 7]]
    assert merged.bias.tolist() == [0.5, 0, -1]


def test_simple_average_exact_values_without_pretrained():
    merged = SimpleAverageAlgorithm().run(BaseModelPool({"a": A, "b": B}))
    assert merged.weight.tolist() == [[1.5, 2, 3], [4, 5, 6], [7, 8, 7]]
    assert merged.bias.tolist() == [0.5, 0, -1]


def test_stream_does_not_modify_inputs():
    pool = small_pool()
    TaskArithmeticAlgorithm().run(pool)
    assert pool.load_model("_pretrained_").weight.tolist() == BASE.weight.tolist()


@pytest.fixture()
def clip_pool(tiny_example) -> CLIPVisionModelPool:
    return CLIPVisionModelPool(
        {"_pretrained_": str(tiny_example.base_model), **{t: str(p) for t, p in tiny_example.finetuned.items()}}
    )


@pytest.mark.parametrize(
    "algorithm, core",
    [
        (TaskArithmeticAlgorithm(scaling_factor=0.3), lambda base, fts: task_arithmetic(base, fts, scaling_factor=0.3)),
        (SimpleAverageAlgorithm(), lambda base, fts: simple_average(fts)),
    ],
)
def test_streamed_equals_in_memory_core(clip_pool, algorithm, core):
    base = vision_state_dict(clip_pool.load_model("_pretrained_"))
    finetuned = [vision_state_dict(clip_pool.load_model(n)) for n in clip_pool.model_names]
    expected = core(base, finetuned)
    merged = vision_state_dict(algorithm.run(clip_pool))
    assert merged.keys() == expected.keys()
    for key in merged:
        assert torch.equal(merged[key], expected[key]), key
    again = vision_state_dict(algorithm.run(clip_pool))
    assert all(torch.equal(again[k], merged[k]) for k in merged)  # deterministic


def test_shape_mismatch_names_model_and_tensor():
    pool = BaseModelPool({"_pretrained_": BASE, "a": A, "wide": nn.Linear(4, 3)})
    with pytest.raises(
        IncompatibleModelsError,
        match=r"model 'wide', tensor 'weight': shape/dtype \(3, 4\)/torch.float32 differs from model '_pretrained_': \(3, 3\)/torch.float32",
    ):
        TaskArithmeticAlgorithm().run(pool)


def test_missing_key_names_model():
    pool = BaseModelPool({"_pretrained_": BASE, "a": A, "nobias": nn.Linear(3, 3, bias=False)})
    with pytest.raises(
        IncompatibleModelsError, match=r"model 'nobias' lacks tensor\(s\) \['bias'\] that the other models have"
    ):
        TaskArithmeticAlgorithm().run(pool)


def test_unexpected_key_in_the_base_model_names_the_base_model():
    extra = nn.Linear(3, 3)
    extra.register_buffer("stray", torch.zeros(1))
    pool = BaseModelPool({"_pretrained_": extra, "a": A, "b": linear([[1, 0, 0], [0, 1, 0], [0, 0, 1]], [0, 0, 0])})
    with pytest.raises(
        IncompatibleModelsError,
        match=r"^model '_pretrained_' has unexpected tensor\(s\) \['stray'\] that the other models lack$",
    ):
        TaskArithmeticAlgorithm().run(pool)


def test_nan_rejected():
    bad = linear([[math.nan, 2, 3], [4, 5, 6], [7, 8, 9]], [0, 0, 0])
    with pytest.raises(IncompatibleModelsError, match=r"model 'bad', tensor 'weight' contains NaN"):
        TaskArithmeticAlgorithm().run(small_pool(bad=bad))


def test_needs_pretrained_and_models():
    with pytest.raises(ModelPoolError, match=r"needs a '_pretrained_' model"):
        TaskArithmeticAlgorithm().run(BaseModelPool({"a": A, "b": B}))
    with pytest.raises(ModelPoolError, match=r"at least 1 fine-tuned model"):
        TaskArithmeticAlgorithm().run(BaseModelPool({"_pretrained_": BASE}))
