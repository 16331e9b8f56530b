"""RankOne-MoE: the SVD experts against the task vectors, the routed MLP against a hand-written formula,
the soft top-k, the upscaled model against task arithmetic, test-time training, checkpoints, bad input,
and the CLI on the mini benchmark."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import interrupt_after_step, run_cli, tiny_clip_pool

from fusion_bench.errors import ConfigError
from fusion_bench.method import CLIPRankOneMoEAlgorithm, TaskArithmeticAlgorithm
from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers
from fusion_bench.method.test_time.rankone_moe import (
    RankOneMoEMLP,
    RankOneRouter,
    rank_one_experts,
    soft_top_k,
)
from fusion_bench.models.hf_clip import vision_encoder_layers

TASKS = ["mnist", "eurosat", "svhn"]
OPTS = {"max_steps": 4, "batch_size": 8, "lr": 0.05, "seed": 0, "svd_accelerator": "cpu"}


def make_pool(example, tasks=TASKS, test_tasks=TASKS):
    return tiny_clip_pool(example, tasks, test_tasks)


@pytest.fixture(scope="module")
def pool(tiny_example):
    return make_pool(tiny_example)


@pytest.fixture(scope="module")
def trained(pool, tmp_path_factory):
    """4 steps with the default rank (32: the tiny MLPs' full rank), checkpoint saved."""
    path = tmp_path_factory.mktemp("rankone") / "routers.ckpt"
    method = CLIPRankOneMoEAlgorithm(**OPTS, save_checkpoint=str(path))
    return method, method.run(pool), path


# ---- rank-one experts --------------------------------------------------------------------------
def test_rank_one_experts_reconstruct_the_task_vectors_at_full_rank_and_truncate_by_singular_value():
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(6, 4, generator=g) for _ in range(3)]
    full = rank_one_experts(taus, 4)
    assert full.left.shape == (6, 12) and full.right.shape == (12, 4)
    for t, tau in enumerate(taus):  # expert t owns columns / rows 4t .. 4t+3
        rebuilt = sum(torch.outer(full.left[:, 4 * t + j], full.right[4 * t + j]) for j in range(4))
        assert torch.allclose(rebuilt, tau, atol=1e-5)
    two = rank_one_experts(taus, 2)
    for t, tau in enumerate(taus):  # the best rank-2 approximation, from numpy's float64 SVD
        u, s, vh = np.linalg.svd(tau.double().numpy())
        best = u[:, :2] @ np.diag(s[:2]) @ vh[:2]
        rebuilt = two.left[:, 2 * t : 2 * t + 2] @ two.right[2 * t : 2 * t + 2]
        assert np.allclose(rebuilt.numpy(), best, atol=1e-5)
        assert np.allclose(np.linalg.norm(two.right[2 * t : 2 * t + 2].numpy(), axis=1), s[:2], atol=1e-5)


# ---- soft top-k ----------------------------------------------------------------------------------
def test_soft_top_k_is_the_authors_sigmoid_mask_around_the_kth_largest_weight():
    r = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.52], [0.0, 1.0, 2.0, 3.0, 4.0]])
    out = soft_top_k(r, 2)
    kth = [0.52, 3.0]  # the 2nd largest of each row
    expected = [[v / (1 + math.exp(-100 * (v - kth[b]))) for v in row] for b, row in enumerate(r.tolist())]
    assert torch.allclose(out, torch.tensor(expected), atol=1e-7)
    assert out[0, 4] == pytest.approx(0.26) and out[1, 3] == pytest.approx(1.5)  # the k-th keeps half
    assert out[0, 0] == pytest.approx(0.9) and out[0, 1] < 1e-15  # well above: kept; well below: gone
    assert out[0, 2] == pytest.approx(0.5 / (1 + math.exp(2)), rel=1e-5)  # 0.02 below the k-th: damped, not dropped
    assert torch.equal(soft_top_k(r, 5)[1], r[1] * torch.sigmoid(100 * (r[1] - 0.0)))  # k = all: min is the kth


# ---- the routed MLP ----------------------------------------------------------------------------------
def _toy(depth=1, select_k=-1, d=4, hidden=6, experts=3, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "fc1.weight": torch.randn(hidden, d, generator=g),
        "fc1.bias": torch.randn(hidden, generator=g),
        "fc2.weight": torch.randn(d, hidden, generator=g),
        "fc2.bias": torch.randn(d, generator=g),
    }
    taus = {k: [torch.randn(*base[f"{k}.weight"].shape, generator=g) for _ in range(experts)] for k in ("fc1", "fc2")}
    factors = {k: rank_one_experts(v, rank) for k, v in taus.items()}
    router = RankOneRouter(d, experts * rank, depth=depth, init_lambda=0.3, generator=g)
    with torch.no_grad():  # routing weights that differ clearly between samples
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    mlp = RankOneMoEMLP(base, factors, torch.nn.GELU(), router, select_k=select_k)
    return mlp, base, factors, router


def _hand_routing(x, router, depth):
    """Per sample: the router's output averaged over the tokens, written out."""
    if depth == 0:
        return router.weight.expand(x.shape[0], -1)
    if depth == 1:
        return torch.stack([(x[b] @ router.fc.weight.T + router.fc.bias).mean(0) for b in range(x.shape[0])])
    hidden = [F.relu(x[b] @ router.fc1.weight.T + router.fc1.bias) for b in range(x.shape[0])]
    return torch.stack([(h @ router.fc2.weight.T + router.fc2.bias).mean(0) for h in hidden])


def _hand_mlp(x, r, base, factors):
    """One sample: W = W0 + Σ_e r_e u_e (s v)_eᵀ built entry by entry, then fc1 -> GELU -> fc2."""
    w = {}
    for k in ("fc1", "fc2"):
        f = factors[k]
        w[k] = base[f"{k}.weight"] + sum(r[e] * torch.outer(f.left[:, e], f.right[e]) for e in range(len(r)))
    h = F.gelu(x @ w["fc1"].T + base["fc1.bias"])
    return h @ w["fc2"].T + base["fc2.bias"]


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_routed_mlp_is_the_rank_one_formula_per_sample_and_batch_averaged(depth):
    mlp, base, factors, router = _toy(depth=depth)
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        r = _hand_routing(x, router, depth)
        expected = torch.stack([_hand_mlp(x[b], r[b], base, factors) for b in range(3)])
        assert torch.allclose(mlp(x), expected, atol=1e-5)
        for b in range(3):  # a sample's output does not depend on its batch
            assert torch.allclose(mlp(x[b : b + 1])[0], expected[b], atol=1e-5)
        mlp.batch_reduce = True  # training: one routing vector, the batch mean
        averaged = torch.stack([_hand_mlp(x[b], r.mean(0), base, factors) for b in range(3)])
        assert torch.allclose(mlp(x), averaged, atol=1e-5)
        assert (depth == 0) == torch.allclose(averaged, expected, atol=1e-3)  # depth 0 ignores the input


def test_routed_mlp_with_select_k_uses_the_soft_top_k_of_each_samples_routing():
    mlp, base, factors, router = _toy(select_k=2)
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        r = _hand_routing(x, router, 1)
        masked = []
        for row in r.tolist():
            kth = sorted(row)[-2]
            masked.append([v / (1 + math.exp(-100 * (v - kth))) for v in row])
        masked = torch.tensor(masked)
        expected = torch.stack([_hand_mlp(x[b], masked[b], base, factors) for b in range(3)])
        assert torch.allclose(mlp(x), expected, atol=1e-5)
        dense = torch.stack([_hand_mlp(x[b], r[b], base, factors) for b in range(3)])
        assert not torch.allclose(dense, expected, atol=1e-3)


def test_router_shapes_and_initialisation():
    g = torch.Generator().manual_seed(0)
    one, two, zero = (RankOneRouter(8, 12, depth=d, init_lambda=0.3, generator=g) for d in (1, 2, 0))
    assert one.fc.weight.shape == (12, 8) and torch.equal(one.fc.bias, torch.full((12,), 0.3))
    assert two.fc1.weight.shape == (24, 8) and two.fc2.weight.shape == (12, 24)
    assert torch.equal(two.fc1.bias, torch.zeros(24)) and torch.equal(two.fc2.bias, torch.full((12,), 0.3))
    assert torch.equal(zero.weight, torch.full((12,), 0.3))
    assert 0.005 < float(two.fc1.weight.detach().std()) < 0.015  # N(0, 0.01²)
    again = RankOneRouter(8, 12, depth=1, init_lambda=0.3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.fc.weight, one.fc.weight)  # seeded


# ---- the upscaled model ----------------------------------------------------------------------------
def test_constant_routing_at_full_rank_is_task_arithmetic(pool):
    moe = CLIPRankOneMoEAlgorithm(max_steps=0, router_hidden_layers=0, svd_accelerator="cpu").run(pool)
    ta = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)
    pixels = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(moe(pixel_values=pixels).pooler_output, ta(pixel_values=pixels).pooler_output, atol=1e-5)
    mlp = vision_encoder_layers(moe.vision_model)[1].mlp
    key = "encoder.layers.1.mlp.fc2.weight"
    assert torch.equal(mlp.base["fc2_weight"], pool.get_tensor("_pretrained_", key))
    tau = pool.get_tensor("eurosat", key) - pool.get_tensor("_pretrained_", key)
    assert mlp.left["fc2"].shape == (32, 3 * 32) and mlp.right["fc2"].shape == (3 * 32, 64)
    assert torch.allclose(mlp.left["fc2"][:, 32:64] @ mlp.right["fc2"][32:64], tau, atol=1e-6)  # expert 1 = eurosat
    truncated = CLIPRankOneMoEAlgorithm(max_steps=0, router_hidden_layers=0, rank_k=4).run(pool)
    assert vision_encoder_layers(truncated.vision_model)[1].mlp.left["fc2"].shape == (32, 12)
    with torch.no_grad():
        assert not torch.allclose(truncated(pixel_values=pixels).pooler_output, ta(pixel_values=pixels).pooler_output)


def test_training_lowers_the_entropy_changes_only_the_routers_and_is_seeded(pool, trained):
    method, model, _ = trained
    untrained = CLIPRankOneMoEAlgorithm(**{**OPTS, "max_steps": 0}).run(pool)
    heads = CLIPTaskClassifiers(pool)
    batches = {t: next(iter(heads.loader(heads.dataset("test", t), batch_size=16)))[0] for t in TASKS}

    def objective(m):
        with torch.no_grad():
            ps = [heads.classifier(m, t)(batches[t]).softmax(-1).double() for t in TASKS]
        return sum(float(-(p * (p + 1e-8).log()).sum(-1).mean()) for p in ps)

    assert objective(model) < objective(untrained) - 0.05
    report = method.extra_report()["rankone_moe"]
    assert report["steps_run"] == 4 and report["entropy_last"] < report["entropy_first"]
    initial = dict(untrained.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, initial[name]) != p.requires_grad, name
    assert sorted(model.router_state_dict()) == [f"layers.{i}.fc.{w}" for i in (0, 1) for w in ("bias", "weight")]
    again = CLIPRankOneMoEAlgorithm(**OPTS).run(pool).router_state_dict()
    assert all(torch.equal(again[k], v) for k, v in model.router_state_dict().items())


def test_evaluation_routes_each_sample_on_its_own(trained):
    _, model, _ = trained
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        batch = model(pixel_values=pixels).pooler_output
        alone = torch.cat([model(pixel_values=pixels[i : i + 1]).pooler_output for i in range(6)])
    assert torch.allclose(batch, alone, atol=1e-5)


# ---- checkpoints -----------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_refusal_for_another_rank(pool, trained, tmp_path):
    _, model, path = trained
    method = CLIPRankOneMoEAlgorithm(checkpoint=str(path))
    loaded = method.run(pool)
    assert method.extra_report()["rankone_moe"] == {"checkpoint": str(path), "trained": False}
    assert all(torch.equal(loaded.router_state_dict()[k], v) for k, v in model.router_state_dict().items())
    model.save_pretrained(str(tmp_path / "folder"))
    assert (tmp_path / "folder" / "rankone_moe.ckpt").is_file()
    from_folder = CLIPRankOneMoEAlgorithm(checkpoint=str(tmp_path / "folder")).run(pool)
    assert all(torch.equal(from_folder.router_state_dict()[k], v) for k, v in model.router_state_dict().items())
    with pytest.raises(ConfigError, match=r"checkpoint: '.*routers\.ckpt' was made for rank_k 32, not 8"):
        CLIPRankOneMoEAlgorithm(checkpoint=str(path), rank_k=8).run(pool)
    with pytest.raises(ConfigError, match=r"was made for select_k -1, not 4"):
        CLIPRankOneMoEAlgorithm(checkpoint=str(path), select_k=4).run(pool)


def test_resume_after_an_interrupt_gives_the_routers_of_an_uninterrupted_run(pool, trained, tmp_path):
    _, model, _ = trained
    state = tmp_path / "state.ckpt"
    interrupted = interrupt_after_step(
        CLIPRankOneMoEAlgorithm(**OPTS, save_interval=2, train_state_path=str(state)), at=3
    )
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(pool)
    assert torch.load(state, weights_only=True)["meta"]["kind"] == "rankone_moe_train_state"
    resumed = CLIPRankOneMoEAlgorithm(**OPTS, save_interval=2, train_state_path=str(state))
    routers = resumed.run(pool).router_state_dict()
    assert resumed.extra_report()["rankone_moe"]["resumed_from_step"] == 2
    assert all(torch.equal(routers[k], v) for k, v in model.router_state_dict().items())
    assert not state.exists()


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"rank_k": 0}, r"option 'rank_k' must be an integer >= 1; got 0"),
        ({"select_k": 0}, r"option 'select_k' must be -1 \(all experts\) or an integer >= 1; got 0"),
        ({"select_k": -2}, r"option 'select_k' must be -1 \(all experts\) or an integer >= 1; got -2"),
        ({"svd_accelerator": "tpu"}, r"option 'svd_accelerator' must be 'auto', 'cpu', 'cuda', 'cuda:N' or null"),
        ({"router_hidden_layers": 3}, r"option 'router_hidden_layers' must be one of \(0, 1, 2\); got 3"),
        ({"init_lambda": "x"}, r"option 'init_lambda' must be a number; got 'x'"),
        ({"optimizer": "sgd"}, r"option 'optimizer' must be one of 'adam'; got 'sgd'"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=r"^rankone_moe: " + message):
        CLIPRankOneMoEAlgorithm(**options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_svd_without_cuda_is_refused():
    with pytest.raises(ConfigError, match=r"option 'svd_accelerator' is 'cuda' but this machine has no CUDA device"):
        CLIPRankOneMoEAlgorithm(svd_accelerator="cuda")


def test_bad_pool_and_sizes(tiny_example, pool):
    with pytest.raises(ConfigError, match=r"rankone_moe: model\(s\) \['svhn'\] have no test dataset in the pool"):
        CLIPRankOneMoEAlgorithm().run(make_pool(tiny_example, test_tasks=TASKS[:2]))
    with pytest.raises(
        ConfigError, match=r"option 'rank_k' is 33 but the MLP matrices \(64 x 32\) have rank at most 32"
    ):
        CLIPRankOneMoEAlgorithm(rank_k=33).run(pool)
    with pytest.raises(ConfigError, match=r"option 'select_k' is 13 but there are 12 rank-one experts per layer"):
        CLIPRankOneMoEAlgorithm(rank_k=4, select_k=13).run(pool)


# ---- the CLI on the mini benchmark -----------------------------------------------------------------------
def test_cli_runs_on_the_mini_benchmark_and_refuses_a_bad_option_in_one_line(tmp_path):
    report = tmp_path / "report.json"
    args = ["method=rankone_moe", "method.max_steps=2", "method.batch_size=4", "method.svd_accelerator=cpu"]
    proc = run_cli([*args, "fast_dev_run=true", f"report_save_path={report}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())
    assert result["rankone_moe"]["steps_run"] == 2 and result["meta"]["fast_dev_run"] is True
    tasks = ["scenes", "vehicles", "aerial", "landcover", "house_numbers", "signs", "handwritten", "textures"]
    assert all(0.0 <= result[t]["accuracy"] <= 1.0 for t in tasks)
    bad = tmp_path / "bad.json"
    proc = run_cli(["method=rankone_moe", "method.rank_k=65", f"report_save_path={bad}"], cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and not bad.exists(), proc.stderr
    assert lines[0].startswith(
        "fusion_bench: error: rankone_moe: option 'rank_k' is 65 but the MLP matrices (256 x 64)"
    )
