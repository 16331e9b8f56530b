"""Fisher merging, RegMean and RegMean++: closed forms on one-layer models (numpy oracles), the tiny CLIP
pool end to end against independent re-computations, resuming, and bad input."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import run_cli
from torch import nn

from fusion_bench.errors import ConfigError, DatasetError
from fusion_bench.method import (
    FisherMergingForCLIPVisionModel,
    RegMeanAlgorithmForCLIP,
    RegMeanAlgorithmForCLIPPlusPlus,
)
from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers
from fusion_bench.method.data.base import first_examples
from fusion_bench.method.data.fisher_merging import fisher_weighted_average
from fusion_bench.method.data.regmean import regmean, solve_regmean
from fusion_bench.modelpool import CLIPVisionModelPool
from fusion_bench.models.fisher import diagonal_fisher
from fusion_bench.models.hf_clip import vision_state_dict
from fusion_bench.models.linear_grams import LinearInputGrams, reduce_off_diagonal

TINY = ["modelpool=CLIPVisionModelPool/tiny-clip_example", "taskpool=CLIPVisionModelTaskPool/tiny-clip_example"]
TASKS = ("mnist", "eurosat", "svhn")


def seeded_linear(seed: int, d_in: int = 3, d_out: int = 4) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_params(layer: nn.Linear) -> tuple[np.ndarray, np.ndarray]:
    return layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()


# ---- Fisher: closed forms on logits = W x + b --------------------------------------------------------
# ∂ log p_c / ∂z = e_c − p, so ∂/∂W = (e_c − p) xᵀ and ∂/∂b = e_c − p.
def np_fisher_batch(W, b, batches):
    """Reference estimator: per batch the gradient of Σ_n Σ_c sqrt(p_nc) log p_nc (p fixed) is
    Σ_n (s_n − (Σ_c s_nc) p_n) x_nᵀ with s = sqrt(p); its square is summed; divided by N."""
    FW, Fb, n = np.zeros_like(W), np.zeros_like(b), 0
    for x in batches:
        p = softmax(x @ W.T + b)  # (B, C)
        s = np.sqrt(p)
        g = s - s.sum(axis=1, keepdims=True) * p  # (B, C)
        FW += (g.T @ x) ** 2
        Fb += g.sum(axis=0) ** 2
        n += len(x)
    return FW / n, Fb / n


def np_fisher_per_example(W, b, batches):
    """Paper: (1/N) Σ_n Σ_c p_nc ((e_c − p_n) x_nᵀ)²."""
    FW, Fb, n = np.zeros_like(W), np.zeros_like(b), 0
    for x in np.concatenate(batches):
        p = softmax(W @ x + b)
        for c in range(len(p)):
            g = np.eye(len(p))[c] - p
            FW += p[c] * np.outer(g, x) ** 2
            Fb += p[c] * g**2
        n += 1
    return FW / n, Fb / n


@pytest.mark.parametrize("estimator, oracle", [("batch", np_fisher_batch), ("per_example", np_fisher_per_example)])
def test_diagonal_fisher_closed_form_one_layer(estimator, oracle):
    layer = seeded_linear(0)
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(4, 3)), rng.normal(size=(2, 3))]  # a short last batch: F /= 6, not 8
    fisher, n = diagonal_fisher(
        layer,
        [torch.tensor(x, dtype=torch.float32) for x in batches],
        dict(layer.named_parameters()),
        estimator=estimator,
    )
    FW, Fb = oracle(*np_params(layer), batches)
    assert n == 6
    np.testing.assert_allclose(fisher["weight"].numpy(), FW, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(fisher["bias"].numpy(), Fb, rtol=1e-5, atol=1e-8)
    assert estimator == "batch" or not np.allclose(FW, np_fisher_batch(*np_params(layer), batches)[0])


@pytest.mark.parametrize("normalize", [True, False])
def test_fisher_merge_closed_form_one_layer(normalize):
    """Fisher of three one-layer models on their own data, then θ = Σ c_i (F_i + ε) θ_i / Σ c_i (F_i + ε) with
    c_i = (1/(‖F_i‖ + ε)) / Σ_j 1/(‖F_j‖ + ε) (or 1/3): all in numpy."""
    eps, rng = 1e-6, np.random.default_rng(2)
    layers = [seeded_linear(s) for s in (3, 4, 5)]
    data = [[rng.normal(scale=1 + i, size=(5, 3))] for i in range(3)]
    fishers = [
        diagonal_fisher(m, [torch.tensor(x[0], dtype=torch.float32)], dict(m.named_parameters()))[0]
        for m, x in zip(layers, data)
    ]
    merged = fisher_weighted_average(
        [{k: v.detach() for k, v in m.state_dict().items()} for m in layers],
        fishers,
        normalize_fisher_weight=normalize,
        minimal_fisher_weight=eps,
    )
    np_f = [np_fisher_batch(*np_params(m), x) for m, x in zip(layers, data)]
    norms = np.array([np.sqrt((fw**2).sum() + (fb**2).sum()) for fw, fb in np_f])
    c = (1 / (norms + eps)) / (1 / (norms + eps)).sum() if normalize else np.full(3, 1 / 3)
    for j, key in enumerate(("weight", "bias")):
        thetas = [np_params(m)[j] for m in layers]
        num = sum(ci * (f[j] + eps) * t for ci, f, t in zip(c, np_f, thetas))
        den = sum(ci * (f[j] + eps) for ci, f in zip(c, np_f))
        np.testing.assert_allclose(merged[key].numpy(), num / den, rtol=1e-5, atol=1e-7)
    assert not np.allclose(merged["weight"].numpy(), np.mean([np_params(m)[0] for m in layers], axis=0), atol=1e-3)


# ---- RegMean: closed forms ---------------------------------------------------------------------------
def test_reduce_off_diagonal_keeps_diagonal_exactly():
    g = torch.tensor([[4.0, 2.0], [2.0, 9.0]])
    assert reduce_off_diagonal(g, 0.95).tolist() == [[4.0, 2.0 * np.float32(0.95)], [2.0 * np.float32(0.95), 9.0]]
    assert reduce_off_diagonal(g, 0.0).tolist() == [[4.0, 0.0], [0.0, 9.0]]


def grams_of(layer: nn.Linear, batches: list[np.ndarray]) -> torch.Tensor:
    """The hooked Gram of ``layer`` over token batches ``(B, T, d)``."""
    with LinearInputGrams({"l": layer}) as hooks, torch.no_grad():
        for x in batches:
            layer(torch.tensor(x, dtype=torch.float32))
    return hooks.grams()["l"]


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_regmean_closed_form_one_layer(ratio):
    """α = 1: W* minimises Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² / n_i (numpy lstsq on the stacked, scaled problem);
    α < 1: W* = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ with G̃ = α G + (1 − α) diag(G). Biases: the mean."""
    rng = np.random.default_rng(3)
    layers = [seeded_linear(s, 3, 2) for s in (6, 7, 8)]
    data = [[rng.normal(size=(2, 5, 3)), rng.normal(size=(1, 5, 3)) * (i + 1)] for i in range(3)]  # tokens of samples
    grams = [{"weight": grams_of(m, x)} for m, x in zip(layers, data)]
    merged = regmean(
        [{k: v.detach() for k, v in m.state_dict().items()} for m in layers], grams, reduce_non_diagonal_ratio=ratio
    )
    xs = [np.concatenate([b.reshape(-1, 3) for b in x]) for x in data]  # (15, 3) rows each
    ws = [np_params(m)[0] for m in layers]
    if ratio == 1.0:
        a = np.concatenate([x / np.sqrt(len(x)) for x in xs])
        y = np.concatenate([x @ w.T / np.sqrt(len(x)) for x, w in zip(xs, ws)])
        expected = np.linalg.lstsq(a, y, rcond=None)[0].T
    else:
        g = [x.T @ x / len(x) for x in xs]
        g = [ratio * gi + (1 - ratio) * np.diag(np.diag(gi)) for gi in g]
        expected = np.linalg.solve(sum(g), sum(gi @ w.T for gi, w in zip(g, ws))).T
    np.testing.assert_allclose(merged["weight"].numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged["bias"].numpy(), np.mean([np_params(m)[1] for m in layers], axis=0), rtol=1e-6)


def test_singular_gram_is_a_clear_error():
    with pytest.raises(DatasetError, match=r"summed Gram matrix of 'fc.weight' is singular .*num_regmean_examples"):
        solve_regmean("fc.weight", torch.zeros(2, 2), torch.ones(2, 3))


def test_first_examples_in_order_or_seeded():
    rows = list(range(10))
    assert list(first_examples(rows, 4, shuffle=False, seed=0)) == [0, 1, 2, 3]
    a, b = list(first_examples(rows, 4, shuffle=True, seed=1)), list(first_examples(rows, 4, shuffle=True, seed=1))
    assert a == b and len(set(a)) == 4 and a != [0, 1, 2, 3]
    assert list(first_examples(rows, 40, shuffle=False, seed=0)) == rows


# ---- the tiny CLIP pool: independent re-computations -----------------------------------------------
def tiny_pool(ex, *, models=TASKS, train=TASKS) -> CLIPVisionModelPool:
    return CLIPVisionModelPool(
        {"_pretrained_": str(ex.base_model), **{t: str(ex.finetuned[t]) for t in models}},
        processor=str(ex.base_model),
        train_datasets={t: {"path": str(ex.datasets[t]), "split": "train"} for t in train},
    )


def task_images(pool, task, batch_size):
    heads = CLIPTaskClassifiers(pool, head_cache_dir=None)
    return heads, [x for x, _ in heads.loader(heads.dataset("train", task), batch_size=batch_size)]


def squared_grads(classifier, params, x, per_example: bool):
    """Yield ``(weight, grads)``: the reference's one batch objective, or each image's classes (weight p_c)."""
    if not per_example:
        logits = classifier(x)
        yield (
            1.0,
            torch.autograd.grad(
                (torch.softmax(logits, -1).detach().sqrt() * torch.log_softmax(logits, -1)).sum(), params
            ),
        )
        return
    for image in x:
        log_p = torch.log_softmax(classifier(image[None]), -1)[0]
        for c in range(len(log_p)):
            yield log_p[c].exp().item(), torch.autograd.grad(log_p[c], params, retain_graph=True)


def oracle_fisher_merge(
    pool, batch_size: int, eps: float = 1e-6, limit: int | None = None, per_example: bool = False
) -> dict[str, np.ndarray]:
    """Each model's Fisher by hand (autograd per batch or per image and class), the merge in float64 numpy."""
    thetas, fishers = [], []
    for task in TASKS:
        model = pool.load_model(task)
        heads, batches = task_images(pool, task, batch_size)
        batches = [batches[0][:limit]] if limit else batches
        classifier, params = heads.classifier(model, task), dict(model.named_parameters())
        total = {k: torch.zeros_like(p) for k, p in params.items()}
        for x in batches:
            for weight, grads in squared_grads(classifier, list(params.values()), x, per_example):
                for k, g in zip(params, grads):
                    total[k] += weight * g**2
        n = sum(len(x) for x in batches)
        fishers.append({k: (v / n).double().numpy() for k, v in total.items()})
        thetas.append({k: p.detach().double().numpy() for k, p in params.items()})
    norms = np.array([np.sqrt(sum((f**2).sum() for f in fi.values())) for fi in fishers])
    c = (1 / (norms + eps)) / (1 / (norms + eps)).sum()
    return {
        k: sum(ci * (f[k] + eps) * t[k] for ci, f, t in zip(c, fishers, thetas))
        / sum(ci * (f[k] + eps) for ci, f in zip(c, fishers))
        for k in thetas[0]
    }


def oracle_grams(module_inputs: dict[str, list[torch.Tensor]]) -> dict[str, np.ndarray]:
    """``Σ XᵀX / rows`` per layer, products in float32 as the method (and the reference) takes them."""
    rows = {k: [x.reshape(-1, x.shape[-1]) for x in xs] for k, xs in module_inputs.items()}
    return {k: sum(x.T @ x for x in xs).double().numpy() / sum(len(x) for x in xs) for k, xs in rows.items()}


def capture_linear_inputs(module: nn.Module, run) -> dict[str, list[torch.Tensor]]:
    """Every nn.Linear's inputs (by ``name.weight``) while ``run()`` runs, via forward pre-hooks."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, k=f"{n}.weight": seen.setdefault(k, []).append(args[0].detach()))
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear)
    ]
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return seen


# Σ G̃ of out_proj's inputs has cond ~1e5 on the tiny random CLIP: float32 rounding of the features (~1e-7)
# moves W* by up to ~5e-6, hence the absolute tolerance of the RegMean oracles on the tiny pool.
REGMEAN_ATOL = 1e-5


def np_regmean_solve(grams: list[np.ndarray], weights: list[np.ndarray], ratio: float = 0.95) -> np.ndarray:
    g = [ratio * gi + (1 - ratio) * np.diag(np.diag(gi)) for gi in grams]
    return np.linalg.solve(sum(g), sum(gi @ w.T for gi, w in zip(g, weights))).T


def oracle_regmean(pool) -> dict[str, np.ndarray]:
    models = {t: pool.load_model(t) for t in TASKS}
    grams = {}
    for task, model in models.items():
        _, batches = task_images(pool, task, 32)
        grams[task] = oracle_grams(capture_linear_inputs(model, lambda: [model(pixel_values=x) for x in batches]))
    states = {t: {k: v.double().numpy() for k, v in vision_state_dict(m).items()} for t, m in models.items()}
    return {
        k: np_regmean_solve([grams[t][k] for t in TASKS], [states[t][k] for t in TASKS])
        if k in grams["mnist"]
        else np.mean([states[t][k] for t in TASKS], axis=0)
        for k in states["mnist"]
    }


def assert_state_close(model: nn.Module, expected: dict[str, np.ndarray], rtol=1e-5, atol=1e-6) -> None:
    got = vision_state_dict(model)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].double().numpy(), value, rtol=rtol, atol=atol, err_msg=key)


def saved_model(path):
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(path)


def test_cli_fisher_merging_matches_independent_fisher(tiny_example, tmp_path):
    out = tmp_path / "merged"
    proc = run_cli(
        [
            "method=fisher_merging/clip_fisher_merging",
            "method.dataloader_kwargs.batch_size=8",
            *TINY,
            f"merged_model_save_path={out}",
            f"report_save_path={tmp_path / 'r.json'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    entries = report["clip_fisher_merging"]
    assert [entries[t]["num_examples"] for t in TASKS] == [40, 40, 40]
    assert sum(entries[t]["coefficient"] for t in TASKS) == pytest.approx(1.0)
    assert_state_close(saved_model(out), oracle_fisher_merge(tiny_pool(tiny_example), batch_size=8))
    assert set(TASKS) <= set(report) and 0 <= report["average"]["accuracy"] <= 1
    assert list((tmp_path / "outputs" / "logs").rglob("metrics.csv"))  # logged to the Fabric's CSV logger


def test_per_example_fisher_merge_matches_independent_fisher(tiny_example):
    pool = tiny_pool(tiny_example)
    merged = FisherMergingForCLIPVisionModel(num_fisher_examples=3, fisher_estimator="per_example").run(pool)
    assert_state_close(merged, oracle_fisher_merge(pool, batch_size=32, limit=3, per_example=True))


def test_cli_regmean_matches_independent_least_squares(tiny_example, tmp_path):
    out = tmp_path / "merged"
    proc = run_cli(
        ["method=regmean/clip_regmean", *TINY, f"merged_model_save_path={out}", "report_save_path=false", "--json"],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["clip_regmean"]["svhn"]["num_tokens"] == 40 * 17  # 16 patches + CLS per image
    assert_state_close(saved_model(out), oracle_regmean(tiny_pool(tiny_example)), atol=REGMEAN_ATOL)


def test_regmean_plusplus_takes_grams_through_merged_layers(tiny_example):
    pool = tiny_pool(tiny_example)
    merged = RegMeanAlgorithmForCLIPPlusPlus(num_regmean_examples=40).run(pool)
    models = {t: pool.load_model(t) for t in TASKS}
    states = {t: {k: v.double().numpy() for k, v in vision_state_dict(m).items()} for t, m in models.items()}
    features = {}
    with torch.no_grad():
        for t in TASKS:
            _, batches = task_images(pool, t, 32)
            features[t] = [merged.pre_layrnorm(merged.embeddings(x)) for x in batches]  # the *merged* embeddings
    for layer in range(2):
        grams = {}
        for t in TASKS:
            own = models[t].encoder.layers[layer]
            grams[t] = oracle_grams(capture_linear_inputs(own, lambda: [own(x, None) for x in features[t]]))
        for name in grams["mnist"]:
            key = f"encoder.layers.{layer}.{name}"
            expected = np_regmean_solve([grams[t][name] for t in TASKS], [states[t][key] for t in TASKS])
            np.testing.assert_allclose(
                vision_state_dict(merged)[key].double().numpy(), expected, rtol=1e-5, atol=REGMEAN_ATOL, err_msg=key
            )
        with torch.no_grad():
            features = {t: [merged.encoder.layers[layer](x, None) for x in xs] for t, xs in features.items()}
    for key in ("embeddings.patch_embedding.weight", "pre_layrnorm.bias", "encoder.layers.1.mlp.fc1.bias"):
        expected = np.mean([states[t][key] for t in TASKS], axis=0)
        np.testing.assert_allclose(vision_state_dict(merged)[key].double().numpy(), expected, rtol=1e-6, atol=1e-9)
    # outside the embeddings, pre-layernorm and encoder layers: θ0 by default (the reference), the mean on request
    theta0 = {k: v.double().numpy() for k, v in vision_state_dict(pool.load_model("_pretrained_")).items()}
    outside = [k for k in theta0 if not k.startswith(("embeddings.", "pre_layrnorm.", "encoder."))]
    assert sorted(outside) == ["post_layernorm.bias", "post_layernorm.weight"]
    for key in outside:
        np.testing.assert_array_equal(vision_state_dict(merged)[key].double().numpy(), theta0[key])
        assert np.abs(np.mean([states[t][key] for t in TASKS], axis=0) - theta0[key]).max() > 1e-5  # the check can fail
    averaged = vision_state_dict(
        RegMeanAlgorithmForCLIPPlusPlus(num_regmean_examples=40, outside_encoder="average").run(pool)
    )
    for key in outside:
        np.testing.assert_allclose(
            averaged[key].double().numpy(), np.mean([states[t][key] for t in TASKS], axis=0), rtol=1e-6
        )
    plain = vision_state_dict(RegMeanAlgorithmForCLIP(num_regmean_examples=40).run(pool))
    assert not torch.allclose(
        plain["encoder.layers.0.self_attn.q_proj.weight"],
        vision_state_dict(merged)["encoder.layers.0.self_attn.q_proj.weight"],
    )


# ---- resuming, determinism, exclusions ------------------------------------------------------------
class Interrupt(Exception):
    pass


@pytest.mark.parametrize(
    "cls, step",
    [
        (FisherMergingForCLIPVisionModel, "_add_model"),
        (RegMeanAlgorithmForCLIP, "_add_model"),
        (RegMeanAlgorithmForCLIPPlusPlus, "_merge_layer"),
    ],
)
def test_interrupted_run_resumes_from_checkpoint(tiny_example, tmp_path, monkeypatch, cls, step):
    pool, ckpt = tiny_pool(tiny_example), tmp_path / "state.ckpt"
    kwargs = {} if cls is FisherMergingForCLIPVisionModel else {"num_regmean_examples": 40}
    full = vision_state_dict(cls(**kwargs).run(pool))
    original, calls = getattr(cls, step), []

    def failing(self, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupt
        return original(self, *args, **kw)

    monkeypatch.setattr(cls, step, failing)
    with pytest.raises(Interrupt):
        cls(checkpoint_path=str(ckpt), **kwargs).run(pool)
    assert ckpt.is_file()
    calls.clear()
    monkeypatch.setattr(cls, step, lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    method = cls(checkpoint_path=str(ckpt), **kwargs)
    resumed = vision_state_dict(method.run(pool))
    assert len(calls) == (2 if step == "_add_model" else 1)  # only what was not finished before the interrupt
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert set(TASKS) <= set(method.extra_report()[method.name])


def test_checkpoint_of_another_pool_or_architecture_is_refused(tiny_example, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    ckpt = str(tmp_path / "state.ckpt")
    RegMeanAlgorithmForCLIP(num_regmean_examples=8, checkpoint_path=ckpt).run(tiny_pool(tiny_example))
    with pytest.raises(
        ConfigError,
        match=r"checkpoint: '.*state.ckpt' was made for models \['mnist', 'eurosat', 'svhn'\], not \['mnist', 'eurosat'\]",
    ):
        RegMeanAlgorithmForCLIP(num_regmean_examples=8, checkpoint_path=ckpt).run(
            tiny_pool(tiny_example, models=TASKS[:2])
        )
    with pytest.raises(ConfigError, match=r"was made for options .*'reduce_non_diagonal_ratio': 0.95.*, not .*0.5"):
        RegMeanAlgorithmForCLIP(num_regmean_examples=8, reduce_non_diagonal_ratio=0.5, checkpoint_path=ckpt).run(
            tiny_pool(tiny_example)
        )
    small = tmp_path / "small"
    torch.manual_seed(0)
    CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    ).save_pretrained(small)
    other = CLIPVisionModelPool(
        {"_pretrained_": str(small), **{t: str(small) for t in TASKS}},
        processor=str(tiny_example.base_model),
        train_datasets={t: str(tiny_example.datasets[t]) for t in TASKS},
    )
    with pytest.raises(ConfigError, match=r"was made for architecture '[0-9a-f]{16}', not '[0-9a-f]{16}'"):
        RegMeanAlgorithmForCLIP(num_regmean_examples=8, checkpoint_path=ckpt).run(other)


def test_shuffled_subset_is_seeded_and_excluded_tensors_keep_pretrained(tiny_example):
    pool = tiny_pool(tiny_example)
    opts = {"num_regmean_examples": 12, "dataloader_kwargs": {"batch_size": 5, "shuffle": True}}
    a = vision_state_dict(
        RegMeanAlgorithmForCLIP(seed=1, exclude_param_names_regex=[r"encoder\.layers\.1\.mlp\."], **opts).run(pool)
    )
    b = vision_state_dict(
        RegMeanAlgorithmForCLIP(seed=1, exclude_param_names_regex=[r"encoder\.layers\.1\.mlp\."], **opts).run(pool)
    )
    c = vision_state_dict(
        RegMeanAlgorithmForCLIP(seed=2, exclude_param_names_regex=[r"encoder\.layers\.1\.mlp\."], **opts).run(pool)
    )
    base = vision_state_dict(pool.load_pretrained_model())
    key = "encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(a[key], b[key]) and not torch.allclose(a[key], c[key])
    for k in ("encoder.layers.1.mlp.fc1.weight", "encoder.layers.1.mlp.fc2.bias"):
        assert torch.equal(a[k], base[k])
    assert not torch.equal(
        a["encoder.layers.1.self_attn.q_proj.weight"], base["encoder.layers.1.self_attn.q_proj.weight"]
    )


# ---- bad input --------------------------------------------------------------------------------------
def test_cli_model_without_its_train_dataset_is_one_line_error(tiny_example, tmp_path):
    proc = run_cli(
        [
            "method=regmean/clip_regmean",
            *TINY,
            "~modelpool.train_datasets.svhn",
            f"report_save_path={tmp_path / 'r.json'}",
        ],
        cwd=tmp_path,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert re.match(
        r"fusion_bench: error: clip_regmean: model\(s\) \['svhn'\] have no train dataset in the pool "
        r"\(train datasets: mnist, eurosat\)",
        lines[0],
    )
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "cls, options, message",
    [
        (
            FisherMergingForCLIPVisionModel,
            {"fisher_estimator": "exact"},
            r"option 'fisher_estimator' must be one of 'batch', 'per_example'; got 'exact'",
        ),
        (
            FisherMergingForCLIPVisionModel,
            {"minimal_fisher_weight": 0},
            r"option 'minimal_fisher_weight' must be in \(0, inf\]",
        ),
        (
            FisherMergingForCLIPVisionModel,
            {"dataloader_kwargs": {"batch_size": 8, "pin_memory": True}},
            r"unknown dataloader_kwargs \['pin_memory'\]; valid: batch_size, num_workers, shuffle",
        ),
        (
            RegMeanAlgorithmForCLIP,
            {"reduce_non_diagonal_ratio": 1.5},
            r"clip_regmean: option 'reduce_non_diagonal_ratio' must be in \[0, 1\]; got 1.5",
        ),
        (
            RegMeanAlgorithmForCLIP,
            {"num_regmean_examples": 0},
            r"option 'num_regmean_examples' must be an integer >= 1; got 0",
        ),
        (
            RegMeanAlgorithmForCLIP,
            {"exclude_param_names_regex": ["("]},
            r"exclude_param_names_regex '\(' is not a regex",
        ),
        (
            RegMeanAlgorithmForCLIPPlusPlus,
            {"dataloader_kwargs": {"batch_size": 0}},
            r"option 'dataloader_kwargs.batch_size' must be an integer >= 1",
        ),
    ],
)
def test_bad_options_are_named(cls, options, message):
    with pytest.raises(ConfigError, match=message):
        cls(**options)


def test_exclusion_matching_nothing_is_named(tiny_example):
    expected = (
        r"exclude_param_names_regex 'vision_model\\\\.encoder' matches no tensor; tensors are named like 'embeddings"
    )
    with pytest.raises(ConfigError, match=expected):
        RegMeanAlgorithmForCLIP(exclude_param_names_regex=[r"vision_model\.encoder"]).run(tiny_pool(tiny_example))
