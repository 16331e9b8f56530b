"""LoRA / L-LoRA: linearisation, adapter folders, the folding pool, clip_finetune variants, errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench.errors import ConfigError, IncompatibleModelsError, ModelLoadError, ModelPoolError
from fusion_bench.merge import stream_merge
from fusion_bench.method.train.clip_finetune import CLIPFinetuneAlgorithm
from fusion_bench.method.task_vector.task_arithmetic import task_arithmetic_tensor
from fusion_bench.modelpool import CLIPVisionLoRAModelPool, CLIPVisionModelPool
from fusion_bench.models.hf_clip import vision_state_dict
from fusion_bench.models.linearized import (
    LinearizedModule,
    load_l_lora_vision_model_hf,
    load_lora_vision_model_hf,
    new_lora_vision_model,
    save_lora_adapter,
)

TARGETS = ("q_proj", "v_proj")


def _targets(state):
    return {k: v for k, v in state.items() if k.endswith(".weight") and k.split(".")[-2] in TARGETS}


def _make_adapter(base_dir, out, *, seed, kind="lora", r=4, alpha=8.0):
    """An adapter with random A and B (a trained one's shape) saved the way clip_finetune saves it."""
    base = CLIPVisionModel.from_pretrained(base_dir)
    base_weights = _targets(vision_state_dict(base))
    model = new_lora_vision_model(
        base, r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.1, linearized=kind == "l_lora", seed=seed
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or (kind == "lora" and "lora_A" in name):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return save_lora_adapter(model, out, kind=kind, base_model_name_or_path=str(base_dir), base_weights=base_weights)


def _factors(folder):
    """Independent reader: ``{module: (A, B)}`` from the adapter's safetensors."""
    raw = load_file(str(folder / "adapter_model.safetensors"))
    mods = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in raw}
    return {m: (raw[f"base_model.model.{m}.lora_A.weight"], raw[f"base_model.model.{m}.lora_B.weight"]) for m in mods}


@pytest.fixture(scope="module")
def adapters(tiny_example, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base_dir = tiny_example.finetuned["mnist"]  # a CLIPVisionModel folder
    return base_dir, {t: _make_adapter(base_dir, root / t, seed=i) for i, t in enumerate(["a", "b"])}


# ---- linearisation ------------------------------------------------------------------------------
def test_linearized_module_is_the_first_order_taylor_expansion():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    p0 = {n: p.detach().clone() for n, p in f.named_parameters()}
    lin = LinearizedModule(f)
    assert torch.allclose(lin(x), f(x))  # at the point
    direction = {n: torch.randn_like(p) for n, p in p0.items()}
    eps = 1e-4
    with torch.no_grad():
        for n, p in f.named_parameters():
            p.copy_(p0[n] + eps * direction[n])
        plus = f(x)
        for n, p in f.named_parameters():
            p.copy_(p0[n] - eps * direction[n])
        minus = f(x)
        for n, p in f.named_parameters():
            p.copy_(p0[n] + 0.5 * direction[n])
    reference = lin.module  # the same parameters: p = p0 + d/2
    expected = torch.func.functional_call(reference, p0, (x,)) + 0.5 * (plus - minus) / (2 * eps)
    assert torch.allclose(lin(x), expected, atol=1e-7)  # f(p0) + J(p0)·(p − p0)
    lin(x).sum().backward()  # the gradient is J(p0)ᵀ·1, wherever p is
    grads = {n: p.grad.clone() for n, p in f.named_parameters()}
    at_p0 = torch.func.grad(lambda params: torch.func.functional_call(reference, params, (x,)).sum())(p0)
    assert all(torch.allclose(grads[n], at_p0[n]) for n in grads)


def test_l_lora_layer_equals_its_weight_space_fold():
    torch.manual_seed(0)
    model = new_lora_vision_model(
        CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=8,
                intermediate_size=8,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=8,
                patch_size=4,
            )
        ),
        r=2,
        lora_alpha=3.0,
        target_modules=["q_proj"],
        lora_dropout=0.0,
    )
    layer = model.base_model.model.encoder.layers[0].self_attn.q_proj
    w0, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach()
    a0, b0 = torch.randn(2, 8), torch.randn(8, 2)  # a general point (B0 != 0)
    lin = LinearizedModule(layer, {"lora_A.default.weight": a0, "lora_B.default.weight": b0})
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)
    x = torch.randn(3, 5, 8)
    weight = w0 + 1.5 * (b0 @ a + b @ a0 - b0 @ a0)  # s = alpha / r = 1.5
    assert torch.allclose(lin(x), x @ weight.T + bias, atol=1e-5)


# ---- adapters and the pool ------------------------------------------------------------------------
def test_pool_folds_adapters_per_tensor_like_peft_merge(adapters):
    base_dir, folders = adapters
    pool = CLIPVisionLoRAModelPool({"_pretrained_": str(base_dir), **{t: str(p) for t, p in folders.items()}})
    assert pool.is_adapter("a") and not pool.is_adapter("_pretrained_")
    merged = vision_state_dict(
        load_lora_vision_model_hf(str(base_dir), folders["a"], merge_and_unload=True)
    )  # peft's fold
    base = vision_state_dict(CLIPVisionModel.from_pretrained(base_dir))
    assert sorted(pool.keys("a")) == sorted(base)
    for key in pool.keys("a"):
        assert torch.allclose(pool.get_tensor("a", key), merged[key], atol=1e-6), key
    changed = [k for k in base if not torch.equal(pool.get_tensor("a", k), base[k])]
    assert sorted(changed) == sorted(_targets(base)) and len(changed) == 2 * 2  # q, v of 2 layers
    loaded = vision_state_dict(pool.load_model("a"))
    assert all(torch.equal(loaded[k], pool.get_tensor("a", k)) for k in loaded)
    peft_model = PeftModel.from_pretrained(CLIPVisionModel.from_pretrained(base_dir), str(folders["a"])).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            peft_model(pixel_values=pixels).pooler_output,
            pool.load_model("a")(pixel_values=pixels).pooler_output,
            atol=1e-5,
        )


def test_task_arithmetic_merges_the_adapters_deltas(adapters):
    base_dir, folders = adapters
    pool = CLIPVisionLoRAModelPool(
        {"_pretrained_": str(base_dir), **{t: {"adapter": str(p)} for t, p in folders.items()}}
    )
    merged = vision_state_dict(stream_merge(pool, lambda k, b, ts: task_arithmetic_tensor(b, ts, scaling_factor=0.3)))
    base = vision_state_dict(CLIPVisionModel.from_pretrained(base_dir))
    expected = dict(base)
    for folder in folders.values():
        for module, (a, b) in _factors(folder).items():  # s = 8 / 4 = 2
            expected[f"{module}.weight"] = expected[f"{module}.weight"] + 0.3 * 2.0 * (b @ a)
    for key in base:
        assert torch.allclose(merged[key], expected[key], atol=1e-6), key


def test_adapter_for_another_base_is_refused(adapters, tiny_example, tmp_path):
    base_dir, folders = adapters
    other = tmp_path / "wide"
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(other)
    pool = CLIPVisionLoRAModelPool({"x": {"adapter": str(folders["a"]), "base": str(other)}})
    with pytest.raises(
        IncompatibleModelsError,
        match=r"model 'x': adapter .* changes 'encoder.layers.0.self_attn.q_proj.weight' by a \(32, 32\) update but base .*wide' has shape \(16, 16\): it is an adapter for another base model \(it was trained on .*clip-tiny_mnist'\)",
    ):
        pool.load_model("x")
    same_shape = tiny_example.finetuned["eurosat"]  # same architecture, other weights: the fingerprint tells
    pool = CLIPVisionLoRAModelPool({"x": {"adapter": str(folders["a"]), "base": str(same_shape)}})
    with pytest.raises(
        IncompatibleModelsError,
        match=r"model 'x': adapter .* was trained on other base weights than base .*clip-tiny_eurosat'",
    ):
        pool.keys("x")
    with pytest.raises(IncompatibleModelsError, match=r"was trained on other base weights"):
        load_lora_vision_model_hf(str(same_shape), folders["a"])


def test_adapter_entry_errors(adapters, tmp_path):
    base_dir, folders = adapters
    with pytest.raises(
        ModelPoolError,
        match=r"model 'x': an adapter entry accepts \['adapter', 'base', 'kind'\]; got unknown keys \['rank'\]",
    ):
        CLIPVisionLoRAModelPool({"x": {"adapter": str(folders["a"]), "rank": 4}})
    with pytest.raises(ModelPoolError, match=r"model 'x': unknown adapter kind 'dora'"):
        CLIPVisionLoRAModelPool({"x": {"adapter": str(folders["a"]), "kind": "dora"}})
    with pytest.raises(
        ModelLoadError, match=r"model 'x': '.*' is not a peft adapter folder \(no adapter_config.json\)"
    ):
        CLIPVisionLoRAModelPool({"x": {"adapter": str(base_dir)}})


# ---- clip_finetune variants -----------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["lora", "l_lora"])
def test_clip_finetune_lora_variants_train_save_and_reload(tiny_example, tmp_path, variant):
    train = {"mnist": {"path": str(tiny_example.datasets["mnist"]), "split": "train"}}
    pool = CLIPVisionModelPool({"_pretrained_": str(tiny_example.base_model)}, train_datasets=train)
    method = CLIPFinetuneAlgorithm(
        task="mnist",
        learning_rate=3e-2,
        num_steps=20,
        batch_size=20,
        seed=0,
        save_path=str(tmp_path / "ad"),
        use_lora=variant == "lora",
        use_l_lora=variant == "l_lora",
        lora_config={"r": 4, "lora_alpha": 8},
    )
    folded = method.run(pool)
    report = method.extra_report()["clip_finetune"]
    assert report["variant"] == variant and report["loss_last"] < report["loss_first"]
    assert report["trainable_params"] == 2 * 2 * (4 * 32 + 32 * 4)  # A and B of q, v in 2 layers of width 32
    assert isinstance(folded, CLIPVisionModel) and all(p.requires_grad for p in folded.parameters())

    base = vision_state_dict(pool.load_pretrained_model())
    out = vision_state_dict(folded)
    factors = _factors(tmp_path / "ad")
    for key in base:  # only the q/v weights moved, by exactly s · B A (A = A0 for L-LoRA: zero gradient)
        module = key.removesuffix(".weight")
        expected = base[key] + 2.0 * factors[module][1] @ factors[module][0] if module in factors else base[key]
        assert torch.allclose(out[key], expected, atol=1e-6), key
    if variant == "l_lora":
        point = load_file(str(tmp_path / "ad" / "linearization_point.safetensors"))
        for module, (a, b) in factors.items():
            assert torch.equal(point[f"base_model.model.{module}.lora_A.weight"], a)  # A never moved
            assert not point[f"base_model.model.{module}.lora_B.weight"].any()  # B0 = 0 (peft's init)

    reloaded = CLIPVisionLoRAModelPool({"_pretrained_": str(tiny_example.base_model), "mnist": str(tmp_path / "ad")})
    assert reloaded.adapter("mnist").kind == variant
    assert all(torch.equal(vision_state_dict(reloaded.load_model("mnist"))[k], out[k]) for k in out)
    unfolded = reloaded.load_adapter_model("mnist").eval()  # peft / linearised model: same function
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(
            unfolded(pixel_values=pixels).pooler_output, folded(pixel_values=pixels).pooler_output, atol=1e-5
        )
    if variant == "l_lora":
        assert any(isinstance(m, LinearizedModule) for m in unfolded.modules())
        l_lora = load_l_lora_vision_model_hf(str(tiny_example.base_model), tmp_path / "ad", merge_and_unload=True)
        assert all(torch.allclose(vision_state_dict(l_lora)[k], out[k], atol=1e-6) for k in out)


def test_clip_finetune_lora_options_are_checked():
    with pytest.raises(
        ConfigError,
        match=r"clip_finetune: unknown lora_config key\(s\) \['rank'\]; valid: r, lora_alpha, target_modules, lora_dropout",
    ):
        CLIPFinetuneAlgorithm(use_lora=True, lora_config={"rank": 4})
    with pytest.raises(ConfigError, match=r"option 'lora_config.target_modules' must be a non-empty list"):
        CLIPFinetuneAlgorithm(use_lora=True, lora_config={"target_modules": "q_proj"})
    with pytest.raises(ConfigError, match=r"option 'use_l_lora' must be true or false; got 'yes'"):
        CLIPFinetuneAlgorithm(use_l_lora="yes")


def test_copied_adapter_folder_without_metadata_is_plain_peft(adapters, tmp_path):
    base_dir, folders = adapters
    plain = tmp_path / "plain"
    shutil.copytree(folders["b"], plain)
    (plain / "fusion_bench_adapter.json").unlink()  # a peft adapter from elsewhere: no fingerprint, kind lora
    pool = CLIPVisionLoRAModelPool({"x": str(plain)})
    assert pool.adapter("x").kind == "lora" and pool.adapter("x").base_fingerprint is None
    assert all(
        torch.equal(pool.get_tensor("x", k), CLIPVisionLoRAModelPool({"y": str(folders["b"])}).get_tensor("y", k))
        for k in pool.keys("x")
    )
