"""SMILE upscaling: exact values of the router and the experts on hand-made layers, the whole model against
its only expert, and a run through the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import run_cli
from torch import nn

from fusion_bench.errors import ConfigError
from fusion_bench.method.upscaling.smile_upscaling import SmileUpscalingAlgorithm
from fusion_bench.modelpool import CLIPVisionModelPool
from fusion_bench.models.smile_moe import SmileGate, SmileMoELinear, upscale_linear

D = torch.float64


def linear(weight, bias) -> nn.Linear:
    layer = nn.Linear(2, 2).to(D)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=D))
        layer.bias.copy_(torch.tensor(bias, dtype=D))
    return layer


# W0 = [[1, 1], [0, 1]], b0 = (0.5, -0.5); expert 1: ΔW = diag(2, 1), Δb = (1, 0) (top right singular vector e1);
# expert 2: ΔW = [[0, 0], [0, 3]], Δb = (0, 2) (top right singular vector e2). So r(x) = (|x1|, |x2|) with gate_k 1.
W0, B0 = [[1.0, 1.0], [0.0, 1.0]], [0.5, -0.5]
WEIGHTS = [torch.tensor([[3.0, 1.0], [0.0, 2.0]], dtype=D), torch.tensor([[1.0, 1.0], [0.0, 4.0]], dtype=D)]
BIASES = [torch.tensor([1.5, -0.5], dtype=D), torch.tensor([0.5, 1.5], dtype=D)]


def upscaled(**options) -> SmileMoELinear:
    layer = upscale_linear(linear(W0, B0), WEIGHTS, BIASES, **{"gate_k": 1, "k": 1, "top_k": 1, **options})
    assert layer is not None
    return layer


def test_gate_scores_are_norms_of_the_projections():
    v1 = torch.tensor([[0.6, 0.0], [0.8, 0.0], [0.0, 1.0]], dtype=D)  # (in=3, 2)
    v2 = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]], dtype=D)
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    assert torch.allclose(SmileGate([v1, v2], 1)(x), torch.tensor([[2.2, 3.0]], dtype=D))
    assert torch.allclose(SmileGate([v1, v2], 2)(x), torch.tensor([[math.sqrt(2.2**2 + 9), math.sqrt(10)]], dtype=D))
    assert torch.equal(SmileGate([v1], 1)(x), torch.ones(1, 1, dtype=D))  # one expert: always chosen


def test_top1_routes_each_token_to_one_rank_k_expert():
    layer = upscaled()
    # x = (1, 0.5): shared W0 x + b0 = (2, 0); expert 1 (rank 1: 2 x1 e1) + Δb1 = (3, 0)
    # x = (0.2, 1): shared (1.7, 0.5); expert 2 (3 x2 e2) + Δb2 = (0, 5)
    x = torch.tensor([[[1.0, 0.5], [0.2, 1.0]]], dtype=D)  # (batch, tokens, in): routed token by token
    assert torch.allclose(layer(x), torch.tensor([[[5.0, 0.0], [1.7, 5.5]]], dtype=D), atol=1e-12)


def test_k_at_the_rank_keeps_the_whole_difference():
    for k in (0, 2, 128):
        # expert 1 now adds ΔW x = (2, 0.5) + Δb1 for x = (1, 0.5)
        assert torch.allclose(upscaled(k=k)(torch.tensor([[1.0, 0.5]], dtype=D)), torch.tensor([[5.0, 0.5]], dtype=D))


def test_top2_mixes_by_the_renormalised_softmax():
    p1 = math.exp(1.0) / (math.exp(1.0) + math.exp(0.5))
    # experts at x = (1, 0.5): (3, 0) and (0, 1.5) + (0, 2); shared (2, 0)
    expected = torch.tensor([[2.0 + 3.0 * p1, 3.5 * (1 - p1)]], dtype=D)
    assert torch.allclose(upscaled(top_k=2)(torch.tensor([[1.0, 0.5]], dtype=D)), expected, atol=1e-12)


def test_a_layer_no_expert_changed_is_left_alone():
    assert upscale_linear(linear(W0, B0), [torch.tensor(W0, dtype=D)], [torch.tensor(B0, dtype=D)]) is None


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match=r"smile_upscaling: option 'gate_k' must be an integer >= 1"):
        SmileUpscalingAlgorithm(gate_k=0)
    with pytest.raises(ConfigError, match=r"option 'k' must be an integer"):
        SmileUpscalingAlgorithm(k=1.5)


def test_with_one_expert_the_model_is_that_expert(tiny_example):
    base = CLIPVisionModelPool({"b": str(tiny_example.base_model)}).load_model("b").double()
    expert = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in expert.modules():
            if isinstance(module, nn.Linear):  # only linear layers differ: everything else is θ0 in both
                module.weight.add_(0.05 * torch.randn(module.weight.shape, generator=gen, dtype=D))
                module.bias.add_(0.05 * torch.randn(module.bias.shape, generator=gen, dtype=D))
    pool = CLIPVisionModelPool({"_pretrained_": base, "task": expert})
    model = SmileUpscalingAlgorithm(k=0).run(pool)
    assert all(isinstance(m, SmileMoELinear) for n, m in model.named_modules() if n.endswith(("q_proj", "fc1")))
    pixels = torch.randn(2, 3, 32, 32, generator=gen, dtype=D)
    with torch.no_grad():
        ours, theirs = model(pixel_values=pixels).pooler_output, expert(pixel_values=pixels).pooler_output
    assert torch.allclose(ours, theirs, atol=1e-10)


def test_smile_runs_from_the_cli_and_saves_its_experts(tiny_example, tmp_path):
    pool = ["modelpool=CLIPVisionModelPool/tiny-clip_example", "taskpool=CLIPVisionModelTaskPool/tiny-clip_example"]
    out = tmp_path / "smile"
    proc = run_cli(
        ["method=smile_upscaling", *pool, f"report_save_path={tmp_path / 'r.json'}", f"merged_model_save_path={out}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    layers = report["smile_upscaling"]["upscaled_layers"]
    assert layers > 0 and 0.0 <= report["average"]["accuracy"] <= 1.0
    meta = json.loads((out / "smile_moe.json").read_text())
    assert meta["models"] == ["mnist", "eurosat", "svhn"] and len(meta["upscaled_layers"]) == layers
    assert (out / "smile_moe.safetensors").stat().st_size > 0
    # the saved model evaluates again through a model pool entry, to the same accuracy
    entry = (
        f"+modelpool.models._pretrained_={{_target_: fusion_bench.models.smile_moe.load_smile_model, path: '{out}'}}"
    )
    proc = run_cli(
        [
            "method=dummy",
            "modelpool=CLIPVisionModelPool/tiny-clip_example_individual",
            "~modelpool.models._pretrained_",
            entry,
            pool[1],
            f"report_save_path={tmp_path / 'again.json'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["average"]["accuracy"] == report["average"]["accuracy"]
    proc = run_cli(["method=smile_upscaling", "method.top_k=4", *pool], cwd=tmp_path)
    assert proc.returncode == 2 and "option 'top_k' (4) exceeds the number of fine-tuned models (3)" in proc.stderr


@pytest.mark.parametrize("k", [2, 0])
def test_a_saved_smile_model_loads_back_to_the_same_outputs(tmp_path, k):
    """``load_smile_model`` rebuilds the saved model: same tensors, same forward (compressed and full experts)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from fusion_bench.models.smile_moe import load_smile_model

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8
    )
    base = CLIPVisionModel(config).eval()
    experts = []
    for _ in range(3):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for module in expert.modules():
                if isinstance(module, nn.Linear):
                    module.weight.add_(0.1 * torch.randn_like(module.weight))
        experts.append(expert)
    pool = CLIPVisionModelPool({"_pretrained_": base, **{f"t{i}": e for i, e in enumerate(experts)}})
    model = SmileUpscalingAlgorithm(k=k, top_k=2).run(pool).eval()
    model.save_pretrained(str(tmp_path))
    loaded = load_smile_model(tmp_path)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in model.state_dict().items())
    pixels = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixels).pooler_output, model(pixel_values=pixels).pooler_output)
    assert loaded.meta["k"] == k and loaded.meta["models"] == ["t0", "t1", "t2"]


def test_loading_a_folder_that_is_not_a_smile_save_is_one_error(tmp_path):
    from fusion_bench.errors import ModelLoadError
    from fusion_bench.models.smile_moe import load_smile_model

    with pytest.raises(ModelLoadError, match="no smile_moe.json"):
        load_smile_model(tmp_path)
    (tmp_path / "smile_moe.json").write_text('{"models": []}')
    (tmp_path / "smile_moe.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is not a SMILE description"):
        load_smile_model(tmp_path)
