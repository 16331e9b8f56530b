"""SVD / per-layer data-free methods: TSV-M, Iso-C, Iso-CTS, WUDI, LiNeS, Model Stock.

Exact values against oracles written out step by step in numpy (float64 models, so the only
difference is rounding), invariants, the shared matrix on the tiny CLIP pool, and bad input.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fusion_bench.errors import ConfigError, ModelPoolError
from fusion_bench.method.subspace.svd import isotropic_spectrum, polar_factor, project_out, truncated_svd
from fusion_bench.method import (
    IsoCAlgorithm,
    IsoCTSAlgorithm,
    LinesAlgorithm,
    ModelStockAlgorithm,
    TSVMergingAlgorithm,
    WUDIMergingAlgorithm,
)
from fusion_bench.method.subspace.iso_merging import iso_c, iso_cts, iso_cts_subspace_sizes
from fusion_bench.method.task_vector.lines import lines
from fusion_bench.method.subspace.model_stock import model_stock
from fusion_bench.method.subspace.task_singular_vectors import tsv_merging
from fusion_bench.method.task_vector.ties_merging import ties_merging
from fusion_bench.method.subspace.wudi_merging import wudi_merging
from fusion_bench.modelpool import BaseModelPool, CLIPVisionModelPool
from fusion_bench.models.hf_clip import vision_state_dict


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """LAPACK's threaded SVD of tiny matrices crawls on a loaded 2-core machine; one thread is
    fast and, like any fixed thread count, deterministic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- tiny float64 models and their numpy views ------------------------------------------------

W0 = [[1, 2, 0, 1], [0, 1, 3, 2], [2, 0, 1, 1], [1, 1, 0, 2]]
TAU_A = [[0.9, -0.3, 0.2, 0.0], [0.1, 0.8, -0.5, 0.3], [-0.2, 0.4, 0.6, -0.7], [0.3, 0.0, -0.1, 0.5]]
TAU_B = [[-0.4, 0.7, 0.1, 0.2], [0.6, -0.2, 0.3, -0.9], [0.0, 0.5, -0.3, 0.4], [0.8, 0.1, 0.2, -0.6]]
TAU_C = [[0.2, 0.1, -0.6, 0.4], [-0.3, 0.5, 0.0, 0.2], [0.7, -0.1, 0.3, 0.1], [0.0, 0.6, 0.4, -0.2]]
B0, BIAS_A, BIAS_B, BIAS_C = [0.5, -1, 0, 2], [0.2, 0, -0.4, 0.1], [-0.6, 0.3, 0.0, 0.5], [0.1, 0.1, 0.3, -0.2]


def linear(weight: list[list[float]], bias: list[float]) -> nn.Linear:
    w = torch.tensor(weight, dtype=torch.float64)
    layer = nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return layer


def plus(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return (np.array(a) + np.array(b)).tolist()


def pool(*taus: tuple[list[list[float]], list[float]]) -> BaseModelPool:
    models = {"_pretrained_": linear(W0, B0)}
    for name, (tau, tau_bias) in zip("abc", taus):
        models[name] = linear(plus(W0, tau), (np.array(B0) + tau_bias).tolist())
    return BaseModelPool(models)


def weights(model: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    return model.weight.detach().numpy(), model.bias.detach().numpy()


def np_polar(x: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


# ---- TSV-M ------------------------------------------------------------------------------------


def test_tsv_merging_exact_values_and_invariants():
    merged_w, merged_b = weights(TSVMergingAlgorithm(alpha=1.0).run(pool((TAU_A, BIAS_A), (TAU_B, BIAS_B))))
    k = 4 // 2  # min(m, n) // T
    us, ss, vts = [], [], []
    for tau in (np.array(TAU_A), np.array(TAU_B)):
        u, s, vt = np.linalg.svd(tau)
        us.append(u[:, :k]), ss.append(s[:k]), vts.append(vt[:k, :])
    u_cat, s_cat, vt_cat = np.hstack(us), np.concatenate(ss), np.vstack(vts)  # (4, 4), (4,), (4, 4)
    expected = np.array(W0) + np_polar(u_cat) @ np.diag(s_cat) @ np_polar(vt_cat)
    np.testing.assert_allclose(merged_w, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(merged_b, np.array(B0) + (np.array(BIAS_A) + BIAS_B) / 2, rtol=0, atol=1e-15)
    # U⊥ and V⊥ are orthonormal, so the merged update's singular values are exactly S_cat
    spectrum = np.linalg.svd(merged_w - np.array(W0), compute_uv=False)
    np.testing.assert_allclose(spectrum, np.sort(s_cat)[::-1], atol=1e-12)


def test_tsv_merging_rectangular_three_tasks_and_alpha():
    tall = lambda t: np.array(t)[:, :3].tolist()  # 4x3 weights, T = 3 -> k = 1
    models = {"_pretrained_": linear(tall(W0), B0)}
    for name, tau in zip("abc", (TAU_A, TAU_B, TAU_C)):
        models[name] = linear(plus(tall(W0), tall(tau)), B0)
    merged_w, _ = weights(TSVMergingAlgorithm(alpha=0.5).run(BaseModelPool(models)))
    tops = [np.linalg.svd(np.array(tall(t)), full_matrices=False) for t in (TAU_A, TAU_B, TAU_C)]
    u_cat = np.stack([u[:, 0] for u, _, _ in tops], axis=1)  # (4, 3)
    vt_cat = np.stack([vt[0] for _, _, vt in tops])  # (3, 3)
    s_cat = np.array([s[0] for _, s, _ in tops])
    expected = np.array(tall(W0)) + 0.5 * np_polar(u_cat) @ np.diag(s_cat) @ np_polar(vt_cat)
    np.testing.assert_allclose(merged_w, expected, rtol=0, atol=1e-12)


# ---- Iso-C / Iso-CTS ------------------------------------------------------------------------


def test_iso_c_exact_values_and_flat_spectrum():
    merged_w, merged_b = weights(IsoCAlgorithm(scaling_factor=1.5).run(pool((TAU_A, BIAS_A), (TAU_B, BIAS_B))))
    u, s, vt = np.linalg.svd(np.array(TAU_A) + np.array(TAU_B))
    expected = np.array(W0) + 1.5 * u @ np.diag(np.full(4, s.mean())) @ vt
    np.testing.assert_allclose(merged_w, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(merged_b, np.array(B0) + 1.5 * (np.array(BIAS_A) + BIAS_B) / 2, atol=1e-15)
    spectrum = np.linalg.svd((merged_w - np.array(W0)) / 1.5, compute_uv=False)
    np.testing.assert_allclose(spectrum, np.full(4, s.mean()), atol=1e-12)  # isotropic


@pytest.mark.parametrize(
    "rank, tasks, fraction, expected",
    [(768, 8, 0.8, (616, 19)), (6, 2, 0.5, (2, 2)), (4, 2, 0.8, (4, 0)), (3, 2, 0.1, (1, 1)), (10, 3, 0.8, (7, 1))],
)
def test_iso_cts_subspace_sizes(rank, tasks, fraction, expected):
    # (6, 2, 0.5): int(3.0) = 3, round(1.5) = 2 (ties to even) -> c = 2; (3, 2, 0.1): round(1.5)·2 = 4 > 3 -> clamped
    assert iso_cts_subspace_sizes(rank, tasks, fraction) == expected


def test_iso_cts_exact_values_and_flat_spectrum():
    rng = np.random.default_rng(7)
    w0, taus = rng.integers(-3, 4, (6, 6)).astype(float), [rng.integers(-5, 6, (6, 6)) / 10 for _ in range(2)]
    models = {"_pretrained_": linear(w0.tolist(), [0.0] * 6)}
    models.update({n: linear((w0 + t).tolist(), [0.0] * 6) for n, t in zip("ab", taus)})
    merged_w, _ = weights(IsoCTSAlgorithm(common_space_fraction=0.5).run(BaseModelPool(models)))
    c, p = 2, 2  # int(6·0.5) = 3, round((6 − 3)/2) = 2 per task -> c = 6 − 4
    u, s, vt = np.linalg.svd(taus[0] + taus[1])
    u_c, s_c, vt_c = u[:, :c], s[:c], vt[:c]
    us, ss, vts = [], [], []
    for tau in taus:
        u_t, s_t, vt_t = np.linalg.svd(tau - u_c @ u_c.T @ tau)
        us.append(u_t[:, :p]), ss.append(s_t[:p]), vts.append(vt_t[:p])
    s_all = np.concatenate(ss + [s_c])
    u_o, vt_o = np_polar(np.hstack(us + [u_c])), np_polar(np.vstack(vts + [vt_c]))
    expected = w0 + u_o @ np.diag(np.full(6, s_all.mean())) @ vt_o
    np.testing.assert_allclose(merged_w, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.svd(merged_w - w0, compute_uv=False), np.full(6, s_all.mean()), atol=1e-12)


def test_iso_cts_without_task_specific_share_equals_iso_c():
    two = pool((TAU_A, BIAS_A), (TAU_B, BIAS_B))  # rank 4, T = 2, fraction 0.8: round(0.5) = 0 per task
    cts, c = weights(IsoCTSAlgorithm(common_space_fraction=0.8).run(two)), weights(IsoCAlgorithm().run(two))
    np.testing.assert_allclose(cts[0], c[0], atol=1e-12)
    np.testing.assert_array_equal(cts[1], c[1])


# ---- WUDI -----------------------------------------------------------------------------------


def np_wudi_loss(merged: np.ndarray, taus: list[np.ndarray]) -> float:
    return sum(np.sum(((merged - t) @ t.T) ** 2) / np.sum(t**2) for t in taus)


def np_wudi(taus: list[np.ndarray], lr: float, steps: int) -> np.ndarray:
    """Adam (torch's update rule, no weight decay) on the WUDI loss, from Σ τ."""
    x, m, v = sum(taus), 0.0, 0.0
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, steps + 1):
        grad = sum(2 * (x - t) @ t.T @ t / np.sum(t**2) for t in taus)
        m, v = beta1 * m + (1 - beta1) * grad, beta2 * v + (1 - beta2) * grad**2
        denom = np.sqrt(v) / math.sqrt(1 - beta2**step) + eps
        x = x - lr / (1 - beta1**step) * m / denom
    return x


def test_wudi_exact_values_and_objective_decreases():
    taus = [np.array(TAU_A), np.array(TAU_B), np.array(TAU_C)]
    algorithm = WUDIMergingAlgorithm(lr=0.01, steps=5)
    merged_w, merged_b = weights(algorithm.run(pool((TAU_A, BIAS_A), (TAU_B, BIAS_B), (TAU_C, BIAS_C))))
    np.testing.assert_allclose(merged_w, np.array(W0) + np_wudi(taus, 0.01, 5), rtol=0, atol=1e-12)
    np.testing.assert_allclose(merged_b, np.array(B0) + (np.array(BIAS_A) + BIAS_B + BIAS_C) / 3, atol=1e-15)
    assert np_wudi_loss(merged_w - np.array(W0), taus) < np_wudi_loss(sum(taus), taus)


def test_wudi_paper_code_variant_merges_only_encoder_linear_weights():
    def block(tau: np.ndarray) -> nn.Module:
        module = nn.Module()
        module.mlp = nn.Module()
        module.mlp.fc1 = linear((np.array(W0) + tau).tolist(), (np.array(B0) + tau[0]).tolist())
        return module

    zero = np.zeros((4, 4))
    models = BaseModelPool({"_pretrained_": block(zero), "a": block(np.array(TAU_A)), "b": block(np.array(TAU_B))})
    merged = WUDIMergingAlgorithm(lr=0.01, steps=3, variant="paper_code").run(models).mlp.fc1
    expected = np.array(W0) + np_wudi([np.array(TAU_A), np.array(TAU_B)], 0.01, 3)
    np.testing.assert_allclose(merged.weight.detach().numpy(), expected, rtol=0, atol=1e-12)
    assert merged.bias.tolist() == B0  # not a linear weight: keeps θ0 as the official script


# ---- LiNeS ----------------------------------------------------------------------------------


class Layered(nn.Module):
    """Keys ``embeddings.*``, ``encoder.layers.{0,1,2}.*``, ``post_layernorm.*`` (like CLIP's)."""

    def __init__(self, offset: float, step: float) -> None:
        super().__init__()
        self.embeddings = nn.Linear(2, 2, dtype=torch.float64)
        self.post_layernorm = nn.LayerNorm(2, dtype=torch.float64)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([nn.Linear(2, 2, dtype=torch.float64) for _ in range(3)])
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                ramp = torch.arange(1.0, p.numel() + 1, dtype=torch.float64).reshape(p.shape)
                p.copy_(offset + step * (i + 1) * ramp)


def layered_pool() -> BaseModelPool:
    return BaseModelPool({"_pretrained_": Layered(1.0, 0.0), "a": Layered(1.0, 0.1), "b": Layered(1.0, -0.03)})


def np_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("post_layernorm, post_scale", [("first", 0.5), ("last", 1.1)])
def test_lines_task_arithmetic_exact_values(post_layernorm, post_scale):
    merged = np_state(LinesAlgorithm(beta=0.6, post_layernorm=post_layernorm).run(layered_pool()))
    base, a, b = (np_state(layered_pool().load_model(n)) for n in ("_pretrained_", "a", "b"))
    # α = 1/T = 0.5 (TA); λ(l) = 0.5 + 0.6 · l / 2 -> 0.5, 0.8, 1.1; embeddings take the first layer's scale
    scales = {
        "embeddings": 0.5,
        "encoder.layers.0": 0.5,
        "encoder.layers.1": 0.8,
        "encoder.layers.2": 1.1,
        "post_layernorm": post_scale,
    }
    for key, value in merged.items():
        scale = next(s for prefix, s in scales.items() if key.startswith(prefix + "."))
        np.testing.assert_allclose(value, base[key] + scale * ((a[key] - base[key]) + (b[key] - base[key])), atol=1e-13)


def test_lines_ties_alpha_from_l1_norms():
    models = layered_pool()
    base, fts = models.load_model("_pretrained_").state_dict(), [models.load_model(n).state_dict() for n in "ab"]
    ties = ties_merging(base, fts, scaling_factor=1.0, threshold=50, merge_func="mean")
    ties_tv = {k: v - base[k] for k, v in ties.items()}
    sum_tv = {k: (fts[0][k] - base[k]) + (fts[1][k] - base[k]) for k in base}
    l1 = lambda sd: sum(v.abs().sum().item() for v in sd.values())  # noqa: E731
    alpha = l1(sum_tv) / (2 * l1(ties_tv))  # ‖Σ τ‖₁ / (T ‖τ_TIES‖₁)
    merged = np_state(LinesAlgorithm(beta=0.4, merge="ties_merging", threshold=50).run(models))
    for key, value in merged.items():
        layer = int(key.split(".")[2]) if key.startswith("encoder.layers.") else 0
        expected = base[key].numpy() + (alpha + 0.4 * layer / 2) * ties_tv[key].numpy()
        np.testing.assert_allclose(value, expected, atol=1e-13)


# ---- Model Stock ----------------------------------------------------------------------------


def test_model_stock_exact_values():
    merged_w, merged_b = weights(ModelStockAlgorithm().run(pool((TAU_A, BIAS_A), (TAU_B, BIAS_B), (TAU_C, BIAS_C))))
    cases = [(merged_w, np.array(W0), [TAU_A, TAU_B, TAU_C]), (merged_b, np.array(B0), [BIAS_A, BIAS_B, BIAS_C])]
    for merged, base, taus in cases:
        taus = [np.array(t).ravel() for t in taus]
        pairs = [(0, 1), (0, 2), (1, 2)]
        cosines = [taus[i] @ taus[j] / (np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]) + 1e-8) for i, j in pairs]
        cos = math.cos(np.mean(np.arccos(cosines)))
        t = 3 * cos / (2 * cos + 1 + 1e-8)
        thetas = [base + tau.reshape(base.shape) for tau in taus]
        np.testing.assert_allclose(merged, t * sum(thetas) / 3 + (1 - t) * base, rtol=0, atol=1e-13)


# ---- SVD helpers -----------------------------------------------------------------------------


def test_svd_helpers():
    x = torch.tensor(TAU_A, dtype=torch.float64)[:, :3]  # (4, 3)
    q = polar_factor(x)
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64))  # orthonormal columns
    torch.testing.assert_close(polar_factor(x.T) @ polar_factor(x.T).T, torch.eye(3, dtype=torch.float64))  # rows
    u, s, vh = truncated_svd(x, 2)
    assert u.shape == (4, 2) and s.shape == (2,) and vh.shape == (2, 3)
    torch.testing.assert_close(u.T @ project_out(x, u), torch.zeros(2, 3, dtype=torch.float64))
    assert isotropic_spectrum(torch.tensor([3.0, 1.0, 2.0])).tolist() == [2.0, 2.0, 2.0]


# ---- every method on the tiny CLIP pool --------------------------------------------------------

METHODS = {
    "tsv_merging": (lambda: TSVMergingAlgorithm(), lambda b, f: tsv_merging(b, f)),
    "iso_c": (lambda: IsoCAlgorithm(), lambda b, f: iso_c(b, f)),
    "iso_cts": (lambda: IsoCTSAlgorithm(), lambda b, f: iso_cts(b, f)),
    "wudi_merging": (lambda: WUDIMergingAlgorithm(lr=1e-3, steps=3), lambda b, f: wudi_merging(b, f, lr=1e-3, steps=3)),
    "lines": (lambda: LinesAlgorithm(), lambda b, f: lines(b, f)),
    "lines_ties": (lambda: LinesAlgorithm(merge="ties_merging"), lambda b, f: lines(b, f, merge="ties_merging")),
    "model_stock": (lambda: ModelStockAlgorithm(), lambda b, f: model_stock(b, f)),
}


@pytest.fixture(scope="module")
def clip_pool(tiny_example) -> CLIPVisionModelPool:
    return CLIPVisionModelPool(
        {"_pretrained_": str(tiny_example.base_model), **{t: str(p) for t, p in tiny_example.finetuned.items()}}
    )


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_on_tiny_clip(clip_pool, name):
    make, core = METHODS[name]
    base = vision_state_dict(clip_pool.load_model("_pretrained_"))
    merged = vision_state_dict(make().run(clip_pool))
    assert merged.keys() == base.keys()
    assert all(merged[k].shape == base[k].shape and merged[k].dtype == base[k].dtype for k in base)
    assert any(not torch.equal(merged[k], base[k]) for k in base)
    again = vision_state_dict(make().run(clip_pool))
    assert all(torch.equal(again[k], merged[k]) for k in merged), "not bitwise deterministic"
    expected = core(base, [vision_state_dict(clip_pool.load_model(n)) for n in clip_pool.model_names])
    assert all(torch.equal(merged[k], expected[k]) for k in merged), "streamed != in-memory core"


# ---- bad input -----------------------------------------------------------------------------------


def test_model_stock_needs_two_models():
    with pytest.raises(ModelPoolError, match=r"at least 2 fine-tuned model\(s\); the pool has \['a'\]"):
        ModelStockAlgorithm().run(pool((TAU_A, BIAS_A)))


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.2])
def test_iso_cts_fraction_out_of_range(fraction):
    with pytest.raises(ConfigError, match=r"iso_cts: option 'common_space_fraction' must be in \(0, 1\)"):
        IsoCTSAlgorithm(common_space_fraction=fraction)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"steps": 0}, r"wudi_merging: option 'steps' must be an integer >= 1; got 0"),
        ({"steps": -5}, r"option 'steps' must be an integer >= 1; got -5"),
        ({"lr": 0}, r"wudi_merging: option 'lr' must be in \(0, inf\]"),
        ({"variant": "paper"}, r"option 'variant' must be one of 'reference', 'paper_code'; got 'paper'"),
    ],
)
def test_wudi_bad_options(options, message):
    with pytest.raises(ConfigError, match=message):
        WUDIMergingAlgorithm(**options)


def test_lines_bad_options_and_unlayered_model():
    with pytest.raises(ConfigError, match=r"lines: option 'merge' must be one of 'task_arithmetic', 'ties_merging'"):
        LinesAlgorithm(merge="dare")
    with pytest.raises(ConfigError, match=r"option 'post_layernorm' must be one of 'first', 'last'; got 'middle'"):
        LinesAlgorithm(post_layernorm="middle")
    with pytest.raises(ModelPoolError, match=r"lines: no tensor name contains 'encoder.layers.<l>.'"):
        LinesAlgorithm().run(pool((TAU_A, BIAS_A), (TAU_B, BIAS_B)))


def test_svd_methods_need_pretrained():
    no_base = BaseModelPool({"a": linear(W0, B0), "b": linear(TAU_A, B0)})
    for algorithm in (TSVMergingAlgorithm(), IsoCAlgorithm(), IsoCTSAlgorithm(), WUDIMergingAlgorithm(steps=1)):
        with pytest.raises(ModelPoolError, match=r"needs a '_pretrained_' model"):
            algorithm.run(no_base)
