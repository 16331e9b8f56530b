"""The task-vector family: exact oracles on 3x3 layers, the shared matrix on the tiny CLIP pool,
and bad input. Expected values are worked out by hand (in the comments) or in plain numpy."""

from __future__ import annotations

import csv
import math
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fusion_bench.errors import ConfigError, IncompatibleModelsError, ModelPoolError
from fusion_bench.method import (
    ConsensusMergingAlgorithm,
    DareTaskArithmeticAlgorithm,
    DareTiesMergingAlgorithm,
    ModelBreadcrumbsAlgorithm,
    PCBMergingAlgorithm,
    TaskArithmeticAlgorithm,
    TaskVectorCosSimilarityAlgorithm,
    TiesMergingAlgorithm,
    WeightedAverageAlgorithm,
)
from fusion_bench.method.averaging.weighted_average import weighted_average
from fusion_bench.method.task_vector.consensus import consensus_merging
from fusion_bench.method.task_vector.dare import (
    dare_drop,
    dare_generator,
    dare_task_arithmetic,
    dare_ties_merging,
    linear_weight_keys,
)
from fusion_bench.method.task_vector.model_breadcrumbs import breadcrumbs_mask, model_breadcrumbs
from fusion_bench.method.task_vector.pcb_merging import pcb_merging
from fusion_bench.method.task_vector.ties_merging import (
    disjoint_merge,
    magnitude_threshold,
    ties_elect_sign,
    ties_merging,
    trim_top_k,
)
from fusion_bench.modelpool import BaseModelPool, CLIPVisionModelPool
from fusion_bench.models.hf_clip import vision_state_dict

Matrix = list[list[float]]
ZERO_W, ZERO_B = [[0.0] * 3] * 3, [0.0] * 3


def linear(weight: Matrix, bias: list[float]) -> nn.Linear:
    layer = nn.Linear(3, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def plus(base: nn.Linear, tv_weight: Matrix, tv_bias: list[float]) -> nn.Linear:
    """θ = θ0 + τ."""
    return linear((base.weight + torch.tensor(tv_weight)).tolist(), (base.bias + torch.tensor(tv_bias)).tolist())


def flat32(layer: nn.Linear) -> np.ndarray:
    """The layer flattened as the reference does: keys sorted (bias, weight); float32."""
    return np.concatenate([layer.bias.detach().numpy().ravel(), layer.weight.detach().numpy().ravel()])


def flat(layer: nn.Linear) -> np.ndarray:
    """:func:`flat32` in float64."""
    return flat32(layer).astype(np.float64)


# ---- TIES -------------------------------------------------------------------------------------
# θ0: weight all 1, bias 0. Threshold 25 %: d = 12 entries per task, k = 12 − int(3) = 9; keep |v| ≥ the
# 9th smallest |v| over the WHOLE model (weight and bias together).
TIES_BASE = linear([[1.0] * 3] * 3, [0.0] * 3)
# τA |.| sorted: 0×6, .25, .5, 1, 5, 6, 8 -> threshold 1: keeps 8, -1, 5, -6 and drops the whole bias.
# Per tensor it would keep bias[0] = .5 (the bias's own top) and drop -1 instead.
TIES_A = plus(TIES_BASE, [[8, -1, 0], [0, 5, 0], [0, 0, -6]], [0.5, 0, 0.25])
# τB |.| sorted: 0×7, 1, 1, 1, 2, 3 -> threshold 1, and the three 1s tie at it: all five non-zeros are kept.
TIES_B = plus(TIES_BASE, [[-3, 1, 0], [0, 2, 0], [1, 0, 0]], [0, 0, 1])
# Σ trimmed: w(0,0) 5, w(0,1) -1+1 = 0 (zero sum), w(1,1) 7, w(2,0) 1, w(2,2) -6, b[2] 1.
# Σγ = 4 positives − 1 negative > 0: the zero-sum entry takes +, so B's +1 wins there.


def ties_pool() -> BaseModelPool:
    return BaseModelPool({"_pretrained_": TIES_BASE, "a": TIES_A, "b": TIES_B})


@pytest.mark.parametrize(
    "merge_func, w11",
    [("sum", 7.0), ("mean", 3.5), ("max", 5.0)],  # (1,1): A 5 and B 2 both agree with +: sum 7, mean 3.5, max 5
)
def test_ties_exact_values_whole_model_threshold(merge_func, w11):
    merged = TiesMergingAlgorithm(scaling_factor=0.5, threshold=25, merge_func=merge_func).run(ties_pool())
    # θ0 + 0.5 · merged τ; merged τ = [[8, 1, 0], [0, w11, 0], [1, 0, -6]], bias [0, 0, 1]
    assert merged.weight.tolist() == [[5, 1.5, 1], [1, 1 + 0.5 * w11, 1], [1.5, 1, -2]]
    assert merged.bias.tolist() == [0, 0, 0.5]  # per-tensor trimming would give bias[0] = 0.25


def test_ties_threshold_and_ties_at_the_threshold():
    tv_b = torch.tensor(flat(TIES_B) - flat(TIES_BASE), dtype=torch.float32)
    assert magnitude_threshold(tv_b.abs(), 0.25).item() == 1.0
    assert int((trim_top_k(tv_b, 0.25) != 0).sum()) == 5  # int(12 · .25) + 1 = 4 plus the tie
    assert magnitude_threshold(tv_b.abs(), 1.0).item() == 0.0  # threshold 100: keep everything


def test_ties_zero_sum_takes_whole_model_majority():
    base = linear(ZERO_W, ZERO_B)
    # weight: (0,0) sums to 0, (1,1) is -2 -> the weight's own Σγ is -1; the bias [2, 1, 1] makes the whole model +2.
    a = linear([[1, 0, 0], [0, -2, 0], [0, 0, 0]], [1, 1, 0])
    b = linear([[-1, 0, 0], [0, 0, 0], [0, 0, 0]], [1, 0, 1])
    merged = TiesMergingAlgorithm(scaling_factor=1.0, threshold=100).run(
        BaseModelPool({"_pretrained_": base, "a": a, "b": b})
    )
    assert merged.weight.tolist() == [[1, 0, 0], [0, -2, 0], [0, 0, 0]]  # (0,0) takes + (A's 1), not the weight's own -
    assert merged.bias.tolist() == [2, 1, 1]
    # per tensor, the weight's own majority (-) would elect B's -1
    per_tensor = ties_elect_sign([a.weight.detach(), b.weight.detach()])
    assert per_tensor[0, 0].item() == -1.0
    assert disjoint_merge([a.weight.detach(), b.weight.detach()], per_tensor)[0, 0].item() == -1.0


def test_ties_core_equals_streamed_on_small_pool():
    sds = [m.state_dict() for m in (TIES_BASE, TIES_A, TIES_B)]
    core = ties_merging(sds[0], sds[1:], scaling_factor=0.5, threshold=25, merge_func="mean")
    streamed = TiesMergingAlgorithm(scaling_factor=0.5, threshold=25, merge_func="mean").run(ties_pool())
    assert all(torch.equal(core[k], v) for k, v in streamed.state_dict().items())


# ---- DARE -------------------------------------------------------------------------------------
DARE_BASE = linear([[1.0] * 3] * 3, [0.0] * 3)
DARE_TVS = {
    "a": ([[1, -2, 3], [-4, 5, -6], [7, -8, 9]], [1, 2, 3]),
    "b": ([[2, 2, 2], [-1, -1, -1], [3, 0, 3]], [-1, 0, 1]),
}


def dare_pool() -> BaseModelPool:
    return BaseModelPool({"_pretrained_": DARE_BASE, **{n: plus(DARE_BASE, *tv) for n, tv in DARE_TVS.items()}})


def test_dare_drop_keeps_and_rescales_exactly():
    tv = torch.arange(1.0, 13.0).reshape(3, 4)
    u = torch.rand((3, 4), generator=torch.Generator().manual_seed(123)).numpy()  # the draws dare_drop consumes
    expected = np.where(u >= 0.3, tv.numpy() / 0.7, 0.0).astype(np.float32)
    got = dare_drop(tv, 0.3, torch.Generator().manual_seed(123))
    assert np.array_equal(got.numpy(), expected)
    assert np.array_equal(
        dare_drop(tv, 0.3, torch.Generator().manual_seed(123), rescale=False).numpy(),
        np.where(u >= 0.3, tv.numpy(), 0.0),
    )
    assert torch.equal(dare_drop(tv, 0.0, torch.Generator().manual_seed(1)), tv)  # p = 0 keeps all


def test_dare_task_arithmetic_exact_values():
    merged = DareTaskArithmeticAlgorithm(scaling_factor=0.5, sparsity_ratio=0.5, seed=5).run(dare_pool())
    for key, index in (("weight", 0), ("bias", 1)):
        total = np.zeros_like(np.asarray(DARE_TVS["a"][index], dtype=np.float32))
        for task, name in enumerate(("a", "b")):
            tv = np.asarray(DARE_TVS[name][index], dtype=np.float32)
            u = torch.rand(tv.shape, generator=dare_generator(5, task, key)).numpy()
            total += np.where(u >= 0.5, tv * 2, 0.0)
        expected = getattr(DARE_BASE, key).detach().numpy() + 0.5 * total
        assert np.array_equal(getattr(merged, key).detach().numpy(), expected), key


def test_dare_is_seeded():
    run = lambda seed: DareTaskArithmeticAlgorithm(seed=seed).run(dare_pool()).state_dict()  # noqa: E731
    first, again, other = run(0), run(0), run(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert dare_generator(0, 1, "w").initial_seed() != dare_generator(0, 2, "w").initial_seed()


def test_dare_without_drop_is_ta_and_ties():
    ta = TaskArithmeticAlgorithm(scaling_factor=0.3).run(dare_pool()).state_dict()
    dare_ta = DareTaskArithmeticAlgorithm(sparsity_ratio=0.0).run(dare_pool()).state_dict()
    assert all(torch.equal(ta[k], dare_ta[k]) for k in ta)
    dare_ties = DareTiesMergingAlgorithm(scaling_factor=0.5, sparsity_ratio=0.0, threshold=25).run(ties_pool())
    assert dare_ties.weight.tolist() == [[5, 1.5, 1], [1, 4.5, 1], [1.5, 1, -2]]  # the TIES oracle above
    assert dare_ties.bias.tolist() == [0, 0, 0.5]


# ---- Model Breadcrumbs ----------------------------------------------------------------------


def test_breadcrumbs_exact_values():
    base = linear(ZERO_W, ZERO_B)
    a = linear([[1, -2, 3], [-4, 5, -6], [7, -8, 9]], [2, -2, 1])
    merged = ModelBreadcrumbsAlgorithm(scaling_factor=1.0, beta=0.5, gamma=0.2).run(
        BaseModelPool({"_pretrained_": base, "a": a})
    )
    # weight, n = 9: drop int(1.8) = 1 outlier (9), keep int(4.5) = 4 (8, 7, 6, 5), drop the rest
    assert merged.weight.tolist() == [[0, 0, 0], [0, 5, -6], [7, -8, 0]]
    # bias, n = 3: no outlier (int(.6) = 0), keep int(1.5) = 1 -> |v| ≥ 2: |2| and |-2| tie there, both kept
    assert merged.bias.tolist() == [2, -2, 0]
    # n = 4: drop the top int(1) = 1 (3), keep the next int(2) = 2 (2 and -1), drop 0.5
    assert breadcrumbs_mask(torch.tensor([3.0, -1.0, 2.0, 0.5]), 0.5, 0.25).tolist() == [False, True, True, False]
    # a tie at the top bound: both 3s are outliers (|v| < s_1 = 3 fails), keep [s_3, s_1) = [2, 3)
    assert breadcrumbs_mask(torch.tensor([3.0, -3.0, 1.0, 2.0]), 0.5, 0.25).tolist() == [False, False, False, True]


# ---- Consensus (TALL masks) -------------------------------------------------------------------
CONS_TVS = {
    "a": [[2, 0, 1], [0, 0, 0], [0, 0, 0]],
    "b": [[2, 1, 0], [0, 0, 0], [0, 0, 0]],
    "c": [[0, 0, 0], [0, 3, 0], [0, 0, 0]],
}


def consensus_pool() -> BaseModelPool:
    base = linear(ZERO_W, ZERO_B)
    return BaseModelPool({"_pretrained_": base, **{n: linear(w, ZERO_B) for n, w in CONS_TVS.items()}})


def consensus_oracle(lam: float, k: int) -> tuple[np.ndarray, list[float], float]:
    """numpy: m_t = |τt| ≥ λ|Σ τ − τt|; keep where Σ_t m_t ≥ k; over weight and bias (12 entries)."""
    tvs = np.stack([np.concatenate([np.zeros(3), np.ravel(w)]) for w in CONS_TVS.values()])  # (3, 12)
    total = tvs.sum(0)
    masks = np.abs(tvs) >= lam * np.abs(total - tvs)
    keep = masks.sum(0) >= k
    return np.where(keep, total, 0.0), [m.mean() for m in masks], keep.mean()


def test_consensus_exact_values_and_report():
    algorithm = ConsensusMergingAlgorithm(scaling_factor=0.5, tall_mask_lambda=1.0, consensus_k=2)
    merged = algorithm.run(consensus_pool())
    # Σ τ = [[4, 1, 1], [0, 3, 0], 0]; (0,0) is used by A and B (kept), (0,1) only by B, (0,2) only by A and
    # (1,1) only by C (selfish: dropped); untouched weights are "used" by all three (value 0).
    assert merged.weight.tolist() == [[2, 0, 0], [0, 0, 0], [0, 0, 0]]
    kept, tall, consensus = consensus_oracle(1.0, 2)
    assert np.array_equal(flat(merged), 0.5 * kept)
    report = algorithm.extra_report()["consensus_merging"]
    assert report["tall_mask_density"] == pytest.approx(dict(zip("abc", tall)))  # 10/12, 10/12, 9/12
    assert report["consensus_mask_density"] == pytest.approx(consensus) == 0.75
    # k = 1 keeps every weight some task uses: plain task arithmetic here
    k1 = ConsensusMergingAlgorithm(scaling_factor=0.5, tall_mask_lambda=1.0, consensus_k=1).run(consensus_pool())
    assert k1.weight.tolist() == [[2, 0.5, 0.5], [0, 1.5, 0], [0, 0, 0]]


def test_consensus_per_task_lambdas():
    # λ_c = 0.2 alone would not change C's mask; λ_a = 10 removes A from (0,0): only B uses it -> dropped
    merged = ConsensusMergingAlgorithm(scaling_factor=1.0, tall_mask_lambda=[10.0, 1.0, 0.2]).run(consensus_pool())
    assert merged.weight.tolist() == [[0, 0, 0], [0, 0, 0], [0, 0, 0]]


def ties_consensus_oracle(
    base: nn.Linear, models: list[nn.Linear], *, density: float, lam: float, k: int, alpha: float, raw: bool = True
) -> tuple[np.ndarray, list[float], float]:
    """numpy, float32: whole-model TIES (sum) τ_MTL; TALL masks from the raw task vectors (``raw=False``: from the
    trimmed ones); θ0 + α (keep ⊙ τ_MTL)."""
    tvs = [flat32(m) - flat32(base) for m in models]  # (d,) each, keys sorted (bias, weight)
    d = tvs[0].size
    trimmed = []
    for tv in tvs:
        thr = np.sort(np.abs(tv))[d - int(d * density) - 1]  # the (d − int(d·density))-th smallest |v|
        trimmed.append(np.where(np.abs(tv) >= thr, tv, np.float32(0)))
    total = np.zeros(d, np.float32)
    for tv in trimmed:
        total = total + tv
    sign = np.sign(total)
    sign[sign == 0] = np.sign(sign.sum())
    mtl = np.zeros(d, np.float32)
    for tv in trimmed:
        mtl = mtl + np.where(np.where(sign > 0, tv > 0, tv < 0), tv, np.float32(0))
    masks = [np.abs(tv) >= np.float32(lam) * np.abs(mtl - tv) for tv in (tvs if raw else trimmed)]
    keep = np.sum(masks, axis=0) >= k
    return (
        flat32(base) + np.float32(alpha) * np.where(keep, mtl, np.float32(0)),
        [float(m.mean()) for m in masks],
        float(keep.mean()),
    )


def test_ties_consensus_builds_the_tall_masks_from_the_raw_task_vectors():
    gen = torch.Generator().manual_seed(0)
    base = linear(torch.randn(3, 3, generator=gen).tolist(), torch.randn(3, generator=gen).tolist())
    models = [
        plus(base, torch.randn(3, 3, generator=gen).tolist(), torch.randn(3, generator=gen).tolist()) for _ in range(3)
    ]
    pool = BaseModelPool({"_pretrained_": base, **{n: m for n, m in zip("abc", models)}})
    options = {"scaling_factor": 0.5, "tall_mask_lambda": 0.6, "consensus_k": 2, "aggregation": "ties", "threshold": 40}
    algorithm = ConsensusMergingAlgorithm(**options)
    merged = algorithm.run(pool)
    expected, tall, consensus = ties_consensus_oracle(base, models, density=0.4, lam=0.6, k=2, alpha=0.5)
    np.testing.assert_allclose(flat32(merged), expected, rtol=0, atol=1e-6)
    report = algorithm.extra_report()["consensus_merging"]
    assert report["tall_mask_density"] == pytest.approx(dict(zip("abc", tall)))
    assert report["consensus_mask_density"] == pytest.approx(consensus)
    # masks built from the trimmed vectors would differ: the test tells the two apart
    _, tall_trimmed, consensus_trimmed = ties_consensus_oracle(
        base, models, density=0.4, lam=0.6, k=2, alpha=0.5, raw=False
    )
    assert tall_trimmed != pytest.approx(tall) and consensus_trimmed != pytest.approx(consensus)
    sds = [m.state_dict() for m in (base, *models)]
    core = consensus_merging(sds[0], sds[1:], scaling_factor=0.5, aggregation="ties", threshold=40)
    assert all(torch.equal(core[k], v) for k, v in merged.state_dict().items())


# ---- PCB ----------------------------------------------------------------------------------------
PCB_TVS = {
    "a": ([[0.9, -0.2, 0.4], [0.05, 1.3, -0.7], [0.3, -0.15, 0.6]], [0.25, -0.45, 0.1]),
    "b": ([[0.5, 0.35, -0.8], [0.2, 0.95, 0.12], [-0.4, 0.55, -1.1]], [-0.3, 0.65, 0.22]),
}


def pcb_oracle(tvs: np.ndarray, ratio: float, min_ratio: float = 1e-4, max_ratio: float = 1e-4) -> np.ndarray:
    """The authors' PCB_merge (duguodong7/pcb-merging, pcb-merging.py) transcribed to numpy, float64."""
    n, d = tvs.shape

    def clamp(x: np.ndarray, low: float, high: float) -> np.ndarray:
        s = np.sort(x, axis=1)
        return np.clip(x, s[:, [int(d * low)]], s[:, [int(d * (1 - high) - 1)]])

    def normalize(x: np.ndarray) -> np.ndarray:
        return (x - x.min(1, keepdims=True)) / (x.max(1, keepdims=True) - x.min(1, keepdims=True))

    magnitudes = clamp(np.abs(tvs), min_ratio, max_ratio)
    score = np.exp(n * normalize(magnitudes) ** 2) * np.tanh(tvs * tvs.sum(0))
    scale = normalize(clamp(score, 1 - ratio, 0))
    return (np.sign(tvs) * magnitudes * scale).sum(0) / np.maximum(scale.sum(0), 1e-12)


def test_pcb_matches_the_authors_formula():
    base = linear([[1.0] * 3] * 3, [0.5] * 3)
    pool = BaseModelPool({"_pretrained_": base, **{n: plus(base, *tv) for n, tv in PCB_TVS.items()}})
    merged = PCBMergingAlgorithm(scaling_factor=1.0, pcb_ratio=0.5).run(pool)
    # τ as the merge sees it: θ − θ0 in float32
    tvs = np.stack([flat32(pool.load_model(n)) - flat32(base) for n in PCB_TVS]).astype(np.float64)  # (2, 12)
    expected = flat(base) + pcb_oracle(tvs, 0.5)
    np.testing.assert_allclose(flat(merged), expected, rtol=1e-6, atol=1e-6)
    assert (np.abs(flat(merged) - flat(base)) > 0).sum() >= 6  # about half of the entries kept, the rest θ0


# ---- weighted average ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, normalize, weight, bias",
    [
        ([1, 3], True, 7.0, [3, 1, -1]),  # 0.25 θA + 0.75 θB
        ([1, 3], False, 28.0, [12, 4, -4]),  # θA + 3 θB
        (None, True, 6.0, [2, 2, 2]),
    ],  # equal weights
)
def test_weighted_average_exact_values(weights, normalize, weight, bias):
    pool = BaseModelPool({"a": linear([[4.0] * 3] * 3, [0, 4, 8]), "b": linear([[8.0] * 3] * 3, [4, 0, -4])})
    merged = WeightedAverageAlgorithm(weights=weights, normalize=normalize).run(pool)
    assert merged.weight.tolist() == [[weight] * 3] * 3
    assert merged.bias.tolist() == bias


# ---- task vector cosine similarity -----------------------------------------------------------


def test_cos_similarity_matches_numpy_and_writes_csv_and_png(tmp_path):
    base = linear([[1.0] * 3] * 3, [0.0] * 3)
    tvs = {
        "a": ([[1, 2, 0], [0, 0, 0], [0, 0, 3]], [1, 0, 0]),
        "b": ([[1, 0, 0], [0, 4, 0], [0, 0, 0]], [0, 2, 0]),
        "c": ([[-1, -2, 0], [0, 1, 0], [0, 0, 1]], [0, 0, 5]),
    }
    pool = BaseModelPool({"_pretrained_": base, **{n: plus(base, *tv) for n, tv in tvs.items()}})
    algorithm = TaskVectorCosSimilarityAlgorithm(save_to_csv=str(tmp_path / "out" / "cos.csv"))
    model = algorithm.run(pool)
    x = np.stack([np.concatenate([np.ravel(w), b]) for w, b in tvs.values()]).astype(np.float64)
    norms = np.linalg.norm(x, axis=1)
    expected = (x @ x.T) / np.outer(norms, norms)
    report = algorithm.extra_report()["task_vector_cos_similarity"]
    assert report["models"] == ["a", "b", "c"]
    np.testing.assert_allclose(report["matrix"], expected, rtol=1e-12, atol=1e-15)
    assert [report["matrix"][i][i] for i in range(3)] == [1.0, 1.0, 1.0]
    rows = list(csv.reader((tmp_path / "out" / "cos.csv").read_text().splitlines()))
    assert rows[0] == ["", "a", "b", "c"] and [r[0] for r in rows[1:]] == ["a", "b", "c"]
    assert [[float(v) for v in r[1:]] for r in rows[1:]] == report["matrix"]
    image = np.asarray(Image.open(tmp_path / "out" / "cos.png").convert("RGB"))
    assert image.shape[0] > 0 and image.shape[1] > 0 and image.std() > 0
    assert model.weight.tolist() == base.weight.tolist() and model.bias.tolist() == base.bias.tolist()  # θ0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cos.csv", "cos.png"]  # no temp files left


# ---- the matrix on the tiny CLIP pool --------------------------------------------------------


@pytest.fixture()
def clip_pool(tiny_example) -> CLIPVisionModelPool:
    return CLIPVisionModelPool(
        {"_pretrained_": str(tiny_example.base_model), **{t: str(p) for t, p in tiny_example.finetuned.items()}}
    )


Core = Callable[[dict, list], dict]
CASES: dict[str, tuple[Callable[[], object], Core | None]] = {
    "ties_sum": (lambda: TiesMergingAlgorithm(), lambda b, f: ties_merging(b, f)),
    "ties_mean": (
        lambda: TiesMergingAlgorithm(merge_func="mean", threshold=10),
        lambda b, f: ties_merging(b, f, merge_func="mean", threshold=10),
    ),
    "dare_task_arithmetic": (
        lambda: DareTaskArithmeticAlgorithm(seed=3),
        lambda b, f: dare_task_arithmetic(b, f, seed=3),
    ),
    "dare_ties_merging": (lambda: DareTiesMergingAlgorithm(seed=3), lambda b, f: dare_ties_merging(b, f, seed=3)),
    "model_breadcrumbs": (lambda: ModelBreadcrumbsAlgorithm(), lambda b, f: model_breadcrumbs(b, f)),
    "ta_consensus": (lambda: ConsensusMergingAlgorithm(), lambda b, f: consensus_merging(b, f)),
    "ties_consensus": (
        lambda: ConsensusMergingAlgorithm(aggregation="ties"),
        lambda b, f: consensus_merging(b, f, aggregation="ties"),
    ),
    "pcb_merging": (lambda: PCBMergingAlgorithm(), lambda b, f: pcb_merging(b, f)),
    "weighted_average": (
        lambda: WeightedAverageAlgorithm(weights=[1, 2, 3]),
        lambda b, f: weighted_average(f, [1, 2, 3]),
    ),
    "task_vector_cos_similarity": (lambda: TaskVectorCosSimilarityAlgorithm(), lambda b, f: dict(b)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_family_matrix_on_tiny_clip(clip_pool, case):
    make, core = CASES[case]
    base = vision_state_dict(clip_pool.load_model("_pretrained_"))
    merged = vision_state_dict(make().run(clip_pool))
    assert merged.keys() == base.keys()
    assert all(merged[k].shape == base[k].shape and merged[k].dtype == base[k].dtype for k in base)
    again = vision_state_dict(make().run(clip_pool))
    assert all(torch.equal(again[k], merged[k]) for k in merged), "not bitwise deterministic"
    assert any(not torch.equal(merged[k], base[k]) for k in base) == (case != "task_vector_cos_similarity")
    finetuned = [vision_state_dict(clip_pool.load_model(n)) for n in clip_pool.model_names]
    expected = core(base, finetuned)
    assert all(torch.equal(merged[k], expected[k]) for k in base), "streamed merge differs from the in-memory core"


def test_dare_only_on_linear_weights(clip_pool):
    linear_keys = linear_weight_keys(clip_pool)
    assert linear_keys and all(k.endswith(".weight") for k in linear_keys)
    ta = vision_state_dict(TaskArithmeticAlgorithm(scaling_factor=0.3).run(clip_pool))
    dare = vision_state_dict(DareTaskArithmeticAlgorithm(only_on_linear_weights=True).run(clip_pool))
    changed = {k for k in ta if not torch.equal(ta[k], dare[k])}
    assert changed == set(linear_keys)


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TiesMergingAlgorithm(threshold=0), r"ties_merging: option 'threshold' must be in \(0, 100\]"),
        (lambda: TiesMergingAlgorithm(threshold=150), r"option 'threshold' must be in \(0, 100\].*got 150"),
        (
            lambda: TiesMergingAlgorithm(merge_func="median"),
            r"'merge_func' must be one of 'sum', 'mean', 'max'; got 'median'",
        ),
        (lambda: DareTaskArithmeticAlgorithm(sparsity_ratio=1.0), r"'sparsity_ratio' must be in \[0, 1\).*got 1.0"),
        (
            lambda: DareTiesMergingAlgorithm(sparsity_ratio=-0.1),
            r"dare_ties_merging: option 'sparsity_ratio' must be in \[0, 1\)",
        ),
        (
            lambda: DareTiesMergingAlgorithm(threshold=101),
            r"dare_ties_merging: option 'threshold' must be in \(0, 100\]",
        ),
        (lambda: DareTaskArithmeticAlgorithm(seed=-1), r"'seed' must be an integer >= 0"),
        (lambda: ModelBreadcrumbsAlgorithm(beta=0), r"'beta' must be in \(0, 1\]"),
        (lambda: ModelBreadcrumbsAlgorithm(gamma=1), r"'gamma' must be in \[0, 1\)"),
        (lambda: PCBMergingAlgorithm(pcb_ratio=0), r"'pcb_ratio' must be in \(0, 1\]"),
        (lambda: PCBMergingAlgorithm(pcb_ratio=1.5), r"'pcb_ratio' must be in \(0, 1\]"),
        (lambda: ConsensusMergingAlgorithm(tall_mask_lambda=-1), r"'tall_mask_lambda' must be in \[0, inf\]"),
        (
            lambda: ConsensusMergingAlgorithm(aggregation="mean"),
            r"'aggregation' must be one of 'task_arithmetic', 'ties_merging', 'ta', 'ties'",
        ),
        (lambda: WeightedAverageAlgorithm(weights=[1, -1]), r"'weights' \[1.0, -1.0\] sums to 0"),
        (lambda: WeightedAverageAlgorithm(weights="abc"), r"'weights' must be a list of numbers"),
        (lambda: TiesMergingAlgorithm(scaling_factor=math.nan), r"'scaling_factor' must be a finite number"),
    ],
)
def test_bad_options_raise_config_error(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_wrong_weight_count_names_both_counts():
    with pytest.raises(
        ConfigError, match=r"'weights' has 2 entries but the pool has 3 fine-tuned models \['a', 'b', 'c'\]"
    ):
        WeightedAverageAlgorithm(weights=[1, 2]).run(consensus_pool())
    with pytest.raises(ConfigError, match=r"'tall_mask_lambda' has 2 entries but the pool has 3 fine-tuned models"):
        ConsensusMergingAlgorithm(tall_mask_lambda=[0.5, 0.5]).run(consensus_pool())


def test_too_few_models_and_missing_base():
    one = BaseModelPool({"_pretrained_": linear(ZERO_W, ZERO_B), "a": linear([[1.0] * 3] * 3, ZERO_B)})
    with pytest.raises(ModelPoolError, match=r"needs at least 2 fine-tuned model\(s\); the pool has \['a'\]"):
        ConsensusMergingAlgorithm().run(one)
    with pytest.raises(ModelPoolError, match=r"needs at least 2 fine-tuned model\(s\)"):
        TaskVectorCosSimilarityAlgorithm().run(one)
    with pytest.raises(ModelPoolError, match=r"needs at least 1 fine-tuned model"):
        TiesMergingAlgorithm().run(BaseModelPool({"_pretrained_": linear(ZERO_W, ZERO_B)}))
    with pytest.raises(ModelPoolError, match=r"needs a '_pretrained_' model"):
        PCBMergingAlgorithm().run(BaseModelPool({"a": TIES_A, "b": TIES_B}))


def test_incompatible_or_nan_models_fail_before_whole_model_passes():
    with pytest.raises(IncompatibleModelsError, match=r"model 'wide', tensor 'weight': shape/dtype \(3, 4\)"):
        TiesMergingAlgorithm().run(BaseModelPool({"_pretrained_": TIES_BASE, "a": TIES_A, "wide": nn.Linear(4, 3)}))
    bad = linear([[math.nan, 2, 3], [4, 5, 6], [7, 8, 9]], [0, 0, 0])
    for algorithm in (TiesMergingAlgorithm(), PCBMergingAlgorithm(), TaskVectorCosSimilarityAlgorithm()):
        with pytest.raises(IncompatibleModelsError, match=r"model 'bad', tensor 'weight' contains NaN"):
            algorithm.run(BaseModelPool({"_pretrained_": TIES_BASE, "a": TIES_A, "bad": bad}))
