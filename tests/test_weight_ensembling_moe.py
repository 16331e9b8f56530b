"""Weight-Ensembling MoE: the routed MLP against hand-merged weights, the upscaled model against task
arithmetic, test-time training (entropy down, only routers change, seeded, resumable), checkpoints,
the efficient variant, bad input, and the CLI end to end."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_after_step, run_cli, tiny_clip_pool

import fusion_bench.models.wemoe as wemoe
from fusion_bench.errors import ConfigError, ModelLoadError
from fusion_bench.method import (
    CLIPWeightEnsemblingMoEAlgorithm,
    SparseCLIPWeightEnsemblingMoEAlgorithm,
    TaskArithmeticAlgorithm,
)
from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers
from fusion_bench.models.hf_clip import is_clip_vision_model, vision_encoder_layers
from fusion_bench.models.wemoe import (
    MLPExperts,
    WEMoERouter,
    WeightEnsemblingMLP,
    magnitude_quantile,
    prune_task_vector,
)

TASKS = ["mnist", "eurosat", "svhn"]
OPTS = {"max_steps": 4, "batch_size": 8, "lr": 0.05, "seed": 0}


def make_pool(example, tasks=TASKS, test_tasks=TASKS, base=None, finetuned=None):
    return tiny_clip_pool(example, tasks, test_tasks, base=base, finetuned=finetuned)


@pytest.fixture(scope="module")
def pool(tiny_example):
    return make_pool(tiny_example)


@pytest.fixture(scope="module")
def trained(pool, tmp_path_factory):
    """The reference run of this file: 4 steps, gradient accumulation, checkpoint saved."""
    path = tmp_path_factory.mktemp("wemoe") / "routers.ckpt"
    method = CLIPWeightEnsemblingMoEAlgorithm(**OPTS, save_checkpoint=str(path))
    return method, method.run(pool), path


def fixed_batches(pool, n=16):
    heads = CLIPTaskClassifiers(pool)
    loaders = {t: heads.loader(heads.dataset("test", t), batch_size=n) for t in TASKS}
    return heads, {t: next(iter(loader))[0] for t, loader in loaders.items()}


def objective(model, heads, batches):
    """Σ_tasks mean_b −Σ_c p log(p + 1e-8), computed here from the logits."""
    total = 0.0
    with torch.no_grad():
        for task, pixels in batches.items():
            p = heads.classifier(model, task)(pixels).softmax(-1).double()
            total += float(-(p * (p + 1e-8).log()).sum(-1).mean())
    return total


# ---- the routed MLP ----------------------------------------------------------------------------
def _toy_mlp(depth=2, seed=0, d=4, hidden=6, experts=3):
    g = torch.Generator().manual_seed(seed)
    shapes = {"fc1.weight": (hidden, d), "fc1.bias": (hidden,), "fc2.weight": (d, hidden), "fc2.bias": (d,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    tvs = {k: torch.randn((experts, *s), generator=g) for k, s in shapes.items()}
    router = WEMoERouter(d, experts, depth=depth, init_lambda=0.3, generator=g)
    with torch.no_grad():  # routing weights that differ clearly between samples
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return WeightEnsemblingMLP(MLPExperts(base, tvs), torch.nn.GELU(), router), base, tvs, router


def _hand_mlp(x, r, base, tvs):
    """One sample: merged weights W0 + Σ r_t τ_t written out, then fc1 -> GELU -> fc2."""
    w = {k: base[k] + sum(r[t] * tvs[k][t] for t in range(len(r))) for k in base}
    h = F.gelu(x @ w["fc1.weight"].T + w["fc1.bias"])
    return h @ w["fc2.weight"].T + w["fc2.bias"]


def test_routed_mlp_matches_hand_merged_weights_per_sample_and_batch_averaged(monkeypatch):
    mlp, base, tvs, router = _toy_mlp()
    x = torch.randn(3, 5, 4)
    r = torch.stack(
        [
            (F.relu(x[b] @ router.fc1.weight.T + router.fc1.bias) @ router.fc2.weight.T + router.fc2.bias).mean(0)
            for b in range(3)
        ]
    )
    expected = torch.stack([_hand_mlp(x[b], r[b], base, tvs) for b in range(3)])
    with torch.no_grad():
        assert torch.allclose(mlp(x), expected, atol=1e-5)
        for b in range(3):  # a sample's output does not depend on its batch
            assert torch.allclose(mlp(x[b : b + 1])[0], expected[b], atol=1e-5)
        monkeypatch.setattr(wemoe, "MAX_MERGED_ELEMENTS", 1)  # one sample per chunk
        assert torch.allclose(mlp(x), expected, atol=1e-5)
        mlp.batch_reduce = True  # the training mode: one merged MLP from the batch-mean routing
        averaged = torch.stack([_hand_mlp(x[b], r.mean(0), base, tvs) for b in range(3)])
        assert torch.allclose(mlp(x), averaged, atol=1e-5) and not torch.allclose(averaged, expected, atol=1e-3)


def test_router_initialisation_is_seeded_and_as_specified():
    def make(depth, seed=3):
        return WEMoERouter(64, 5, depth=depth, init_lambda=0.3, generator=torch.Generator().manual_seed(seed))

    router = make(2)
    assert torch.equal(router.fc1.bias, torch.zeros(64)) and torch.equal(router.fc2.bias, torch.full((5,), 0.3))
    assert 0.009 < router.fc1.weight.std().item() < 0.011 and 0.008 < router.fc2.weight.std().item() < 0.012
    assert all(torch.equal(a, b) for a, b in zip(router.state_dict().values(), make(2).state_dict().values()))
    assert not torch.equal(router.fc1.weight, make(2, seed=4).fc1.weight)
    assert torch.equal(make(0)(torch.randn(2, 7, 64)), torch.full((5,), 0.3))
    assert make(1)(torch.randn(2, 7, 64)).shape == (2, 7, 5) and not hasattr(make(1), "fc1")


def test_pruning_keeps_entries_above_the_quantile():
    v = torch.randn(40, 25, generator=torch.Generator().manual_seed(0))
    a = v.abs().numpy().astype(np.float64)
    for q in (0.0, 0.37, 0.9, 0.999):
        assert magnitude_quantile(v, q).item() == pytest.approx(np.quantile(a, q), rel=1e-6)
    pruned = prune_task_vector(v, 0.9)
    keep = torch.from_numpy(a > np.quantile(a, 0.9))
    assert torch.equal(pruned, torch.where(keep, v, torch.zeros(())))
    assert int(keep.sum()) == 100  # 10% of 1000 distinct magnitudes
    assert prune_task_vector(v, 0.0) is v


# ---- the upscaled model -------------------------------------------------------------------------
def test_untrained_constant_routing_is_task_arithmetic(pool):
    moe = CLIPWeightEnsemblingMoEAlgorithm(max_steps=0, router_hidden_layers=0).run(pool)
    ta = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(moe(pixel_values=pixels).pooler_output, ta(pixel_values=pixels).pooler_output, atol=1e-5)
    assert is_clip_vision_model(moe)
    mlp = vision_encoder_layers(moe.vision_model)[1].mlp
    assert torch.equal(mlp.base["fc1_weight"], pool.get_tensor("_pretrained_", "encoder.layers.1.mlp.fc1.weight"))
    tau = pool.get_tensor("eurosat", "encoder.layers.1.mlp.fc2.bias") - pool.get_tensor(
        "_pretrained_", "encoder.layers.1.mlp.fc2.bias"
    )
    assert torch.equal(mlp.task_vectors["fc2_bias"][1], tau)


def test_training_lowers_the_entropy_and_changes_only_the_routers(pool, trained):
    method, model, _ = trained
    untrained = CLIPWeightEnsemblingMoEAlgorithm(**{**OPTS, "max_steps": 0}).run(pool)
    heads, batches = fixed_batches(pool)
    before, after = objective(untrained, heads, batches), objective(model, heads, batches)
    assert after < before - 0.1, (before, after)
    report = method.extra_report()["clip_weight_ensembling_moe"]
    assert (
        report["steps_run"] == 4 and report["entropy_last"] < report["entropy_first"] and report["seconds_per_step"] > 0
    )
    trained_params, initial_params = dict(model.named_parameters()), dict(untrained.named_parameters())
    for name, p in trained_params.items():
        same = torch.equal(p, initial_params[name])
        assert same != p.requires_grad, name  # routers moved, everything else is the frozen base
    assert sum(p.requires_grad for p in trained_params.values()) == 8  # 2 layers x (fc1, fc2) x (weight, bias)


def test_evaluation_routes_each_sample_on_its_own(trained):
    _, model, _ = trained
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = model(pixel_values=pixels).pooler_output
        alone = torch.cat([model(pixel_values=pixels[i : i + 1]).pooler_output for i in range(6)])
        model.train()
        averaged = model(pixel_values=pixels).pooler_output
        model.eval()
    assert torch.allclose(batch, alone, atol=1e-5) and not torch.allclose(batch, averaged, atol=1e-4)


def test_seeded_and_gradient_accumulation_gives_the_same_gradient(pool, trained):
    _, model, _ = trained
    again = CLIPWeightEnsemblingMoEAlgorithm(**OPTS).run(pool).router_state_dict()
    summed = CLIPWeightEnsemblingMoEAlgorithm(**OPTS, use_grad_accumulate=False).run(pool).router_state_dict()
    for key, tensor in model.router_state_dict().items():
        assert torch.equal(again[key], tensor), key
        assert torch.allclose(summed[key], tensor, rtol=1e-4, atol=1e-6), key


# ---- checkpoints --------------------------------------------------------------------------------
def test_checkpoint_round_trip_skips_training(pool, trained, tmp_path):
    _, model, path = trained
    method = CLIPWeightEnsemblingMoEAlgorithm(checkpoint=str(path))
    loaded = method.run(pool)
    assert method.extra_report()["clip_weight_ensembling_moe"] == {"checkpoint": str(path), "trained": False}
    for key, tensor in model.router_state_dict().items():
        assert torch.equal(loaded.router_state_dict()[key], tensor), key
    meta = torch.load(path, weights_only=True)["meta"]
    assert meta["models"] == TASKS and meta["upscaled_layers"] == [0, 1] and meta["hidden_size"] == 32
    model.save_pretrained(str(tmp_path / "folder"))  # what merged_model_save_path= writes
    from_folder = CLIPWeightEnsemblingMoEAlgorithm(checkpoint=str(tmp_path / "folder")).run(pool)
    assert all(torch.equal(from_folder.router_state_dict()[k], v) for k, v in model.router_state_dict().items())
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_resume_after_an_interrupt_gives_the_routers_of_an_uninterrupted_run(pool, trained, tmp_path):
    _, model, _ = trained
    state = tmp_path / "state.ckpt"
    interrupted = interrupt_after_step(
        CLIPWeightEnsemblingMoEAlgorithm(**OPTS, save_interval=2, train_state_path=str(state)), 3
    )
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(pool)
    assert torch.load(state, weights_only=True)["step"] == 2
    resumed = CLIPWeightEnsemblingMoEAlgorithm(**OPTS, save_interval=2, train_state_path=str(state))
    routers = resumed.run(pool).router_state_dict()
    assert resumed.extra_report()["clip_weight_ensembling_moe"]["resumed_from_step"] == 2
    assert all(torch.equal(routers[k], v) for k, v in model.router_state_dict().items())
    assert not state.exists()  # the finished run's routers supersede the training state


def test_stale_training_state_is_refused(pool, tmp_path):
    state = tmp_path / "state.ckpt"
    method = interrupt_after_step(
        CLIPWeightEnsemblingMoEAlgorithm(**{**OPTS, "max_steps": 3}, save_interval=1, train_state_path=str(state)), 1
    )
    with pytest.raises(KeyboardInterrupt):
        method.run(pool)
    with pytest.raises(
        ConfigError, match=r"train state: '.*state\.ckpt' was made for lr 0\.05, not 0\.02; delete it to start over"
    ):
        CLIPWeightEnsemblingMoEAlgorithm(**{**OPTS, "lr": 0.02}, train_state_path=str(state)).run(pool)
    with pytest.raises(
        ConfigError, match=r"checkpoint: '.*state\.ckpt' was made for kind 'wemoe_train_state', not 'wemoe_routers'"
    ):
        CLIPWeightEnsemblingMoEAlgorithm(checkpoint=str(state)).run(pool)


def test_checkpoint_for_another_pool_or_architecture_is_refused(tiny_example, pool, trained, tmp_path):
    from fusion_bench.testing.tiny_clip import build_tiny_clip, make_finetuned_variant

    path = str(trained[2])
    with pytest.raises(
        ConfigError,
        match=r"checkpoint: '.*routers\.ckpt' was made for models \['mnist', 'eurosat', 'svhn'\], not \['mnist', 'eurosat'\]",
    ):
        CLIPWeightEnsemblingMoEAlgorithm(checkpoint=path).run(make_pool(tiny_example, tasks=TASKS[:2]))
    with pytest.raises(ConfigError, match=r"was made for upscaled_layers \[0, 1\], not \[1\]"):
        CLIPWeightEnsemblingMoEAlgorithm(checkpoint=path, num_upscaled_layers=1).run(pool)
    with pytest.raises(ConfigError, match=r"was made for shared_gate False, not True"):
        SparseCLIPWeightEnsemblingMoEAlgorithm(checkpoint=path, tv_prune_ratio=0.0).run(pool)
    small = build_tiny_clip(
        tmp_path / "small", corpus=["a photo of a cat.", "a photo of a dog."], hidden_size=16, intermediate_size=24
    )
    variants = {t: make_finetuned_variant(small, tmp_path / t, seed=i) for i, t in enumerate(TASKS)}
    with pytest.raises(ConfigError, match=r"was made for hidden_size 32, not 16"):
        CLIPWeightEnsemblingMoEAlgorithm(checkpoint=path).run(make_pool(tiny_example, base=small, finetuned=variants))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"checkpoint: '.*junk\.ckpt' is not a FusionBench checkpoint"):
        CLIPWeightEnsemblingMoEAlgorithm(checkpoint=str(tmp_path / "junk.ckpt")).run(pool)


# ---- the efficient variant and layer choice ---------------------------------------------------------
def test_efficient_variant_prunes_task_vectors_and_shares_one_router(pool):
    model = SparseCLIPWeightEnsemblingMoEAlgorithm(max_steps=1, batch_size=4, num_upscaled_layers=1).run(pool)
    assert list(model.routers()) == ["layers.1"] and model.upscaled_layers == [1]
    assert type(vision_encoder_layers(model.vision_model)[0].mlp).__name__ == "CLIPMLP"
    model = SparseCLIPWeightEnsemblingMoEAlgorithm(max_steps=1, batch_size=4).run(pool)
    layers = vision_encoder_layers(model.vision_model)
    assert layers[0].mlp.router is layers[1].mlp.router and list(model.routers()) == ["shared"]
    assert {k.split(".")[1] for k in model.router_state_dict()} == {"fc1", "fc2"}
    key = "encoder.layers.0.mlp.fc1.weight"
    tau = (pool.get_tensor("svhn", key) - pool.get_tensor("_pretrained_", key)).numpy().astype(np.float64)
    expected = np.where(np.abs(tau) > np.quantile(np.abs(tau), 0.9), tau, 0.0)
    assert np.allclose(layers[0].mlp.task_vectors["fc1_weight"][2].numpy(), expected, atol=1e-7)
    assert (expected != 0).mean() == pytest.approx(0.1, abs=0.002)


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"router_hidden_layers": 3}, r"option 'router_hidden_layers' must be one of \(0, 1, 2\); got 3"),
        ({"tv_prune_ratio": 1.0}, r"option 'tv_prune_ratio' must be in \[0, 1\); got 1\.0"),
        ({"init_lambda": "x"}, r"option 'init_lambda' must be a number; got 'x'"),
        ({"optimizer": "sgd"}, r"option 'optimizer' must be one of 'adam'; got 'sgd'"),
        ({"save_checkpoint": 3}, r"option 'save_checkpoint' must be a path, or null/false for none; got 3"),
        ({"use_grad_accumulate": "no"}, r"option 'use_grad_accumulate' must be true or false; got 'no'"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=r"clip_weight_ensembling_moe: " + message):
        CLIPWeightEnsemblingMoEAlgorithm(**options)


def test_bad_pool(tiny_example, pool):
    with pytest.raises(
        ConfigError, match=r"clip_weight_ensembling_moe: model\(s\) \['svhn'\] have no test dataset in the pool"
    ):
        CLIPWeightEnsemblingMoEAlgorithm().run(make_pool(tiny_example, test_tasks=TASKS[:2]))
    with pytest.raises(ConfigError, match=r"option 'num_upscaled_layers' is 3 but the model has 2 encoder layers"):
        CLIPWeightEnsemblingMoEAlgorithm(num_upscaled_layers=3).run(pool)


# ---- the CLI ----------------------------------------------------------------------------------------
def test_cli_trains_saves_and_reevaluates_the_checkpoint(tiny_example, tmp_path):
    tiny = ["modelpool=CLIPVisionModelPool/tiny-clip_example", "taskpool=CLIPVisionModelTaskPool/tiny-clip_example"]
    ckpt, logs = tmp_path / "c.ckpt", tmp_path / "logs"
    train = [
        "method=weight_ensembling_moe",
        "method.name=clip_weight_ensembling_moe",
        "method.use_grad_accumulate=false",
        f"method.save_checkpoint={ckpt}",
        "method.max_steps=3",
        "method.batch_size=8",
        "method.lr=0.05",
        f"fabric.loggers.root_dir={logs}",
        *tiny,
        f"report_save_path={tmp_path / 'train.json'}",
    ]
    proc = run_cli(train, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = json.loads((tmp_path / "train.json").read_text())
    summary = first["clip_weight_ensembling_moe"]
    assert summary["steps_run"] == 3 and ckpt.is_file() and not ckpt.with_name("c.ckpt.train_state").exists()
    rows = list(csv.DictReader(next(logs.rglob("metrics.csv")).open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert float(rows[0]["entropy/total"]) == pytest.approx(summary["entropy_first"])  # 3 steps: windows of 1
    assert float(rows[-1]["entropy/total"]) == pytest.approx(summary["entropy_last"])
    assert all(float(r["entropy/total"]) == pytest.approx(sum(float(r[f"entropy/{t}"]) for t in TASKS)) for r in rows)
    proc = run_cli(
        [
            "method=weight_ensembling_moe",
            f"method.checkpoint={ckpt}",
            *tiny,
            f"report_save_path={tmp_path / 'eval.json'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    second = json.loads((tmp_path / "eval.json").read_text())
    assert second["clip_weight_ensembling_moe"] == {"checkpoint": str(ckpt), "trained": False}
    for task in [*TASKS, "average"]:
        assert second[task] == first[task]
    pool = make_pool(tiny_example)
    from fusion_bench.taskpool import CLIPVisionModelTaskPool

    taskpool = CLIPVisionModelTaskPool(
        {t: str(p) for t, p in tiny_example.datasets.items()},
        clip_model=str(tiny_example.base_model),
        head_cache_dir=None,
        dataloader_kwargs={"batch_size": 7},
    )
    expected = taskpool.evaluate(CLIPWeightEnsemblingMoEAlgorithm(checkpoint=str(ckpt)).run(pool))
    for task in TASKS:  # another batch size, the same numbers: routing is per sample
        assert first[task]["accuracy"] == pytest.approx(expected[task]["accuracy"])
        assert first[task]["loss"] == pytest.approx(expected[task]["loss"], rel=1e-5)


def test_routers_or_a_train_state_made_for_other_weights_are_refused(trained, tiny_example, tmp_path):
    """Same model names, other values (two experts swapped): the saved routers and an interrupted run's state
    belong to other weights, so the run stops with one ConfigError instead of using them."""
    _, _, path = trained
    swapped = dict(
        tiny_example.finetuned, mnist=tiny_example.finetuned["eurosat"], eurosat=tiny_example.finetuned["mnist"]
    )
    other = make_pool(tiny_example, finetuned=swapped)
    with pytest.raises(ConfigError, match=r"was made for other weights of the pool's models"):
        CLIPWeightEnsemblingMoEAlgorithm(checkpoint=str(path)).run(other)
    state = tmp_path / "state.ckpt"
    with pytest.raises(KeyboardInterrupt):
        interrupt_after_step(
            CLIPWeightEnsemblingMoEAlgorithm(**OPTS, save_interval=2, train_state_path=str(state)), at=3
        ).run(make_pool(tiny_example))
    with pytest.raises(ConfigError, match=r"train state .* was made for other weights.*delete it to start over"):
        CLIPWeightEnsemblingMoEAlgorithm(**OPTS, save_interval=2, train_state_path=str(state)).run(other)
