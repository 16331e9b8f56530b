"""Pareto weight-ensembling MoE: the preference grid, the router's map from a preference to merge weights, the
merged module for a one-hot preference, the scalarised losses (linear and EPO) against hand computations, the
front's figure, training (only the routers change, seeded), checkpoints, bad input, and the CLI on the tiny
example and on the mini benchmark."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import interrupt_after_step, run_cli
from torch import nn

from fusion_bench.errors import ConfigError
from fusion_bench.method.data.pwe_moe import (
    ParetoWeightEnsemblingModule,
    PreferenceRouter,
    PWEMoEAlgorithm,
    _non_dominated,
    epo_loss_weights,
    linear_scalarization,
    plot_pareto_front,
    simplex_grid,
)
from fusion_bench.modelpool import CLIPVisionModelPool

TASKS = ["mnist", "eurosat", "svhn"]
PNG = b"\x89PNG\r\n\x1a\n"


# ---- preference vectors ------------------------------------------------------------------------------
def test_simplex_grid_points():
    assert simplex_grid(2, 3) == [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    assert simplex_grid(3, 2) == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert simplex_grid(3, 3) == [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.0],
        [0.5, 0.0, 0.5],
        [0.0, 1.0, 0.0],
        [0.0, 0.5, 0.5],
        [0.0, 0.0, 1.0],
    ]
    grid = simplex_grid(8, 3)
    assert len(grid) == math.comb(8 + 3 - 2, 8 - 1) == 36
    assert all(abs(sum(p) - 1) < 1e-12 and all(v in (0.0, 0.5, 1.0) for v in p) for p in grid)
    assert len({tuple(p) for p in grid}) == 36


# ---- the router and the merged weights ----------------------------------------------------------------
def _hand_router(depth: int) -> PreferenceRouter:
    """T = 2 with hand-set weights."""
    router = PreferenceRouter(2, depth=depth)
    with torch.no_grad():
        if depth == 2:
            router.fc1.weight.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5], [-1.0, -1.0], [0.0, 3.0]]))
            router.fc1.bias.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]))
            router.fc2.weight.copy_(torch.tensor([[0.5, 1.0, -2.0, 0.25], [-1.0, 0.0, 1.0, 0.5]]))
        else:
            router.fc2.weight.copy_(torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
        router.fc2.bias.copy_(torch.tensor([0.3, -0.1]))
    return router


def _hand_routing(depth: int, p: list[float]) -> list[float]:
    """r(p) of :func:`_hand_router` in plain Python."""
    if depth == 2:
        w1 = [[1.0, -1.0], [2.0, 0.5], [-1.0, -1.0], [0.0, 3.0]]
        b1 = [0.1, -0.2, 0.3, -0.4]
        h = [max(0.0, sum(w * x for w, x in zip(row, p)) + b) for row, b in zip(w1, b1)]
        w2 = [[0.5, 1.0, -2.0, 0.25], [-1.0, 0.0, 1.0, 0.5]]
    else:
        h, w2 = p, [[0.5, -1.0], [2.0, 0.25]]
    return [sum(w * x for w, x in zip(row, h)) + b for row, b in zip(w2, [0.3, -0.1])]


def _toy_module(depth: int) -> ParetoWeightEnsemblingModule:
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        base.bias.copy_(torch.tensor([0.5, -0.5]))
    vectors = {
        "weight": torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [-2.0, 0.0]]]),
        "bias": torch.tensor([[1.0, 1.0], [0.0, -3.0]]),
    }
    return ParetoWeightEnsemblingModule(base, vectors, _hand_router(depth))


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("p", [[0.25, 0.75], [1.0, 0.0], [0.0, 1.0]])
def test_preference_maps_to_merge_weights_by_the_router_formula(depth, p):
    module = _toy_module(depth)
    module.set_preference(torch.tensor(p))
    r = _hand_routing(depth, p)
    assert module.routing_weights().tolist() == pytest.approx(r, abs=1e-6)
    merged = module.merged_tensors()
    w = [[1 + r[0], 2 + 2 * r[1]], [3 - 2 * r[1], 4 + r[0]]]  # W0 + r1 τ1 + r2 τ2
    b = [0.5 + r[0], -0.5 + r[0] - 3 * r[1]]
    assert torch.allclose(merged["weight"], torch.tensor(w), atol=1e-6)
    assert merged["bias"].tolist() == pytest.approx(b, abs=1e-6)
    x = [1.0, -2.0]
    expected = [sum(wi * xi for wi, xi in zip(row, x)) + bi for row, bi in zip(w, b)]
    assert module(torch.tensor([x])).squeeze(0).tolist() == pytest.approx(expected, abs=1e-5)
    folded = module.merged_module()
    assert isinstance(folded, nn.Linear) and torch.allclose(folded.weight, torch.tensor(w), atol=1e-6)


def test_one_hot_preference_of_a_linear_router_picks_its_column():
    module = _toy_module(1)
    module.set_preference(torch.tensor([1.0, 0.0]))  # r = W[:, 0] + b = (0.5 + 0.3, 2 - 0.1)
    merged = module.merged_tensors()
    assert torch.allclose(merged["weight"], torch.tensor([[1.8, 2 + 2 * 1.9], [3 - 2 * 1.9, 4.8]]), atol=1e-6)
    assert merged["bias"].tolist() == pytest.approx([1.3, -0.5 + 0.8 - 3 * 1.9], abs=1e-6)


def test_forward_follows_the_router_after_an_optimiser_step():
    module = _toy_module(1)
    module.set_preference(torch.tensor([1.0, 0.0]))
    x = torch.tensor([[1.0, -2.0]])
    first = module(x)
    optimizer = torch.optim.SGD(module.router.parameters(), lr=0.1)
    first.sum().backward()
    optimizer.step()
    with torch.no_grad():
        expected = module.merged_module()(x)  # from the updated router
        assert not torch.allclose(first, expected)
        assert torch.allclose(module(x), expected, atol=1e-6)  # no stale cache


def test_router_initialisation():
    for depth in (1, 2):
        a = PreferenceRouter(4, depth=depth, init_lambda=0.3, generator=torch.Generator().manual_seed(7))
        b = PreferenceRouter(4, depth=depth, init_lambda=0.3, generator=torch.Generator().manual_seed(7))
        assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
        assert torch.equal(a.fc2.bias, torch.full((4,), 0.3)) and a.fc2.weight.std().item() < 0.05
        assert a.fc2.weight.shape == ((4, 8) if depth == 2 else (4, 4))
    assert torch.equal(a.fc1.bias, torch.zeros(8)) and a.fc1.weight.shape == (8, 4)
    with torch.no_grad():  # zero weights: every routing weight is init_lambda whatever the preference
        a.fc1.weight.zero_()
        a.fc2.weight.zero_()
    assert a(torch.tensor([0.1, 0.2, 0.3, 0.4])).tolist() == pytest.approx([0.3] * 4)


def test_task_vectors_and_base_are_frozen_only_the_router_learns():
    module = _toy_module(2)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"router.fc1.weight", "router.fc1.bias", "router.fc2.weight", "router.fc2.bias"}


# ---- scalarisations -------------------------------------------------------------------------------------
def test_linear_scalarization():
    losses, p = torch.tensor([0.5, 2.0, 1.0]), torch.tensor([0.2, 0.3, 0.5])
    assert linear_scalarization(losses, p).item() == pytest.approx(0.2 * 0.5 + 0.3 * 2.0 + 0.5 * 1.0)


def test_epo_balance_step_solves_its_linear_program():
    losses, ray = np.array([1.0, 3.0]), np.array([0.5, 0.5])
    gram = np.array([[1.0, -0.5], [-0.5, 1.0]])
    # by hand: l̂ = rl / Σ rl, μ = Σ l̂ log(2 l̂) > 1e-4, a = r (log(2 l̂) − μ), Ca = G a
    shares = [0.5 / 2.0, 1.5 / 2.0]
    mu = sum(s * math.log(2 * s) for s in shares)
    a = [0.5 * (math.log(2 * s) - mu) for s in shares]
    ca = [a[0] - 0.5 * a[1], -0.5 * a[0] + a[1]]
    assert mu > 1e-4 and ca[0] < 0 < ca[1]
    # task 2 has the largest rl: (Gα)_2 ≥ 0; task 1's Ca < 0: (Gα)_1 ≥ Ca_1; maximise α·Ca over the simplex.
    # α·Ca falls with α1, so α1 is the smallest feasible: α1 − 0.5 (1 − α1) = Ca_1
    alpha1 = (ca[0] + 0.5) / 1.5
    assert -0.5 * alpha1 + (1 - alpha1) >= 0
    assert epo_loss_weights(losses, ray, gram).tolist() == pytest.approx([2 * alpha1, 2 * (1 - alpha1)], abs=1e-9)


def test_epo_on_the_ray_descends_and_falls_back_on_bad_losses():
    ray = np.array([0.5, 0.5])
    # losses proportional to 1 / ray: μ = 0, the dominance LP maximises Σ (Gα)_j = α·(1, 4) -> α = (0, 1)
    assert epo_loss_weights(np.array([1.0, 1.0]), ray, np.diag([1.0, 4.0])).tolist() == pytest.approx([0.0, 2.0])
    assert epo_loss_weights(np.array([0.0, 1.0]), ray, np.eye(2)).tolist() == [1.0, 1.0]  # p / Σ p, times T


# ---- the figure -------------------------------------------------------------------------------------------
def test_non_dominated_points():
    points = [(1.0, 5.0), (2.0, 4.0), (1.5, 3.0), (3.0, 1.0), (2.0, 4.0)]
    assert _non_dominated(points) == [0, 1, 4, 3]  # (1.5, 3) is beaten by (2, 4); equal points both stay


@pytest.mark.parametrize("tasks", [["a", "b"], ["a", "b", "c"]])
def test_front_figure_is_written(tmp_path, tasks):
    front = []
    for p in simplex_grid(len(tasks), 3):
        acc = {t: {"accuracy": 0.2 + 0.6 * v, "loss": 1.0} for t, v in zip(tasks, p)}
        front.append({"preference": dict(zip(tasks, p)), "tasks": acc})
    path = plot_pareto_front(tmp_path / "front.png", front, tasks, title="t")
    assert path.read_bytes()[:8] == PNG
    assert plot_pareto_front(tmp_path / "front.svg", front, tasks, title="t").read_text().lstrip().startswith("<?xml")


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss": "mgda"}, r"option 'loss' must be one of 'linear_scalarization', 'exact_pareto_optimal'; got 'mgda'"),
        ({"router_hidden_layers": 0}, r"option 'router_hidden_layers' must be 1 or 2; got 0"),
        ({"upscale_mlp": False, "upscale_attn": False}, r"options 'upscale_mlp' and 'upscale_attn' are both false"),
        ({"alpha": 0}, r"option 'alpha' must be in \(0, inf\]; got 0"),
        ({"lr": -1e-5}, r"option 'lr' must be in \(0, inf\]; got -1e-05"),
        ({"num_steps": -1}, r"option 'num_steps' must be an integer >= 0; got -1"),
        ({"eval_grid_m": 1}, r"option 'eval_grid_m' must be an integer >= 2; got 1"),
        ({"dataloader_kwargs": {"batch_size": 0}}, r"option 'dataloader_kwargs.batch_size' must be an integer >= 1"),
        ({"dataloader_kwargs": {"shuffle": True}}, r"unknown dataloader_kwargs \['shuffle'\]"),
        ({"plot_path": "front.txt"}, r"option 'plot_path' must end in .png, .pdf, .svg; got 'front.txt'"),
        ({"plot_path": "f.png", "eval_grid": False}, r"option 'plot_path' needs eval_grid=true or preference_vectors"),
        ({"plot_tasks": ["a"]}, r"option 'plot_tasks' must name two different tasks"),
        ({"preference_vectors": "0.5,0.5"}, r"option 'preference_vectors' must be a non-empty list of lists"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=r"^pwe_moe: " + message):
        PWEMoEAlgorithm(**options)


def make_pool(example, tasks=TASKS, train=True):
    models = {"_pretrained_": str(example.base_model), **{t: str(example.finetuned[t]) for t in tasks}}
    datasets = {t: {"path": str(example.datasets[t]), "split": "train"} for t in tasks} if train else None
    return CLIPVisionModelPool(models, train_datasets=datasets)


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"preference_vectors": [[0.5, 0.5]]},
            r"option 'preference_vectors' must have one entry per model of the pool \(3\)",
        ),
        ({"preference_vectors": [[0.5, 0.5, 0.5]]}, r"option 'preference_vectors' must sum to 1"),
        ({"preference_vectors": [[1.5, -0.5, 0.0]]}, r"option 'preference_vectors' must be in \[0, inf\]; got -0.5"),
        ({"return_preference": [1, 1, 1]}, r"option 'return_preference' must sum to 1"),
        ({"eval_grid_n": 8}, r"option 'eval_grid_n' is 8 but the pool has 3 models"),
    ],
)
def test_bad_preferences_are_refused_before_any_work(tiny_example, options, message):
    with pytest.raises(ConfigError, match=r"^pwe_moe: " + message):
        PWEMoEAlgorithm(**options).run(make_pool(tiny_example, train=False))


def test_missing_train_data_is_refused(tiny_example):
    with pytest.raises(ConfigError, match=r"pwe_moe: model\(s\) \['mnist', 'eurosat', 'svhn'\] have no train dataset"):
        PWEMoEAlgorithm(num_steps=1).run(make_pool(tiny_example, train=False))


# ---- training ------------------------------------------------------------------------------------------------
OPTS = {"num_steps": 3, "lr": 0.05, "dataloader_kwargs": {"batch_size": 4}, "eval_grid": False, "seed": 0}


@pytest.mark.parametrize("loss", ["linear_scalarization", "exact_pareto_optimal"])
def test_training_changes_only_the_routers_and_is_seeded(tiny_example, loss):
    pool = make_pool(tiny_example)
    method = PWEMoEAlgorithm(**OPTS, loss=loss)
    model = method.build(pool, TASKS, method._meta(TASKS, method._layout(pool)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert len(model.upscaled) == 2 * 2  # 2 encoder layers x (MLP, self-attention)
    method._train(model, method_heads(method, pool), TASKS)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    routers = {n for n in before if ".router." in n}
    assert changed and changed <= routers
    assert len(method._history) == 3 and all(math.isfinite(v) for v in method._history)
    again = PWEMoEAlgorithm(**OPTS, loss=loss)
    second = again.build(pool, TASKS, again._meta(TASKS, again._layout(pool)))
    again._train(second, method_heads(again, pool), TASKS)
    assert all(
        torch.equal(a, b) for a, b in zip(model.router_state_dict().values(), second.router_state_dict().values())
    )


def _interrupted(opts: dict, at: int) -> PWEMoEAlgorithm:
    """A method that raises KeyboardInterrupt right after its step ``at`` (its periodic state written)."""
    return interrupt_after_step(PWEMoEAlgorithm(**opts), at)


def test_resume_after_an_interrupt_gives_the_routers_of_an_uninterrupted_run(tiny_example, tmp_path):
    pool = make_pool(tiny_example)
    state = tmp_path / "state.ckpt"
    opts = {**OPTS, "num_steps": 4, "save_interval": 2, "train_state_path": str(state)}
    whole = PWEMoEAlgorithm(**{**opts, "save_interval": 0})
    expected = whole.run(pool).state_dict()
    with pytest.raises(KeyboardInterrupt):
        _interrupted(opts, 3).run(pool)
    assert torch.load(state, weights_only=True)["step"] == 2
    resumed = PWEMoEAlgorithm(**opts)
    merged = resumed.run(pool).state_dict()
    assert resumed.extra_report()["pwe_moe"]["resumed_from_step"] == 2
    assert resumed._history == whole._history
    assert all(torch.equal(merged[k], v) for k, v in expected.items())
    assert not state.exists()  # the finished run supersedes it
    with pytest.raises(KeyboardInterrupt):
        _interrupted(opts, 3).run(pool)
    with pytest.raises(ConfigError, match=r"train state: .* was made for lr 0\.05, not 0\.02; delete it to start over"):
        PWEMoEAlgorithm(**{**opts, "lr": 0.02}).run(pool)


def method_heads(method, pool):
    from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers

    return CLIPTaskClassifiers(pool, what=method.name)


def test_untrained_model_at_any_preference_is_near_task_arithmetic(tiny_example):
    """Routers start at init_lambda (weights ~ N(0, 0.01²)): with them zeroed, every preference gives task
    arithmetic at λ = init_lambda exactly."""
    from fusion_bench.method import TaskArithmeticAlgorithm

    pool = make_pool(tiny_example)
    method = PWEMoEAlgorithm(num_steps=0, eval_grid=False, init_lambda=0.3)
    model = method.build(pool, TASKS, method._meta(TASKS, method._layout(pool)))
    with torch.no_grad():
        for m in model.upscaled.values():
            m.router.fc1.weight.zero_()
            m.router.fc2.weight.zero_()
    reference = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool).state_dict()
    merged = model.merged_model([0.7, 0.2, 0.1]).state_dict()
    assert merged.keys() == reference.keys()
    assert max((merged[k].float() - reference[k].float()).abs().max().item() for k in merged) < 1e-6


# ---- the CLI ---------------------------------------------------------------------------------------------------
TINY = ["modelpool=CLIPVisionModelPool/tiny-clip_example", "taskpool=CLIPVisionModelTaskPool/tiny-clip_example"]
THIRD = 1 / 3


def test_cli_reports_the_front_plots_it_and_reloads_the_routers(tiny_example, tmp_path):
    ckpt = tmp_path / "routers.ckpt"
    prefs = f"[[1,0,0],[0,1,0],[0,0,1],[{THIRD},{THIRD},{THIRD}]]"
    args = [
        "method=pwe_moe/pwe_moe_ls_for_clip",
        *TINY,
        "method.num_steps=2",
        "method.dataloader_kwargs.batch_size=4",
        f"method.preference_vectors={prefs}",
        "method.plot_tasks=[svhn,mnist]",
        f"method.plot_path={tmp_path / 'front.png'}",
        f"method.save_checkpoint={ckpt}",
        f"report_save_path={tmp_path / 'train.json'}",
    ]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "train.json").read_text())
    pwe = report["pwe_moe"]
    assert pwe["trained"] and pwe["num_steps"] == 2 and pwe["loss"] == "linear_scalarization"
    front = pwe["pareto_front"]
    assert np.allclose([list(e["preference"].values()) for e in front], [[1, 0, 0], [0, 1, 0], [0, 0, 1], [THIRD] * 3])
    for entry in front:
        assert set(entry["tasks"]) == set(TASKS)
        mean = sum(entry["tasks"][t]["accuracy"] for t in TASKS) / 3
        assert entry["average"]["accuracy"] == pytest.approx(mean)
    # the returned model is the equal-preference merge: the task pool's numbers are the last entry's
    assert all(front[-1]["tasks"][t]["accuracy"] == report[t]["accuracy"] for t in TASKS)
    assert (tmp_path / "front.png").read_bytes()[:8] == PNG and ckpt.is_file()

    proc = run_cli(
        [*args[:-3], f"method.checkpoint_path={ckpt}", f"report_save_path={tmp_path / 'eval.json'}"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = json.loads((tmp_path / "eval.json").read_text())["pwe_moe"]
    assert not again["trained"] and again["pareto_front"] == front


def test_cli_refuses_a_bad_option_in_one_line(tiny_example, tmp_path):
    proc = run_cli(["method=pwe_moe/pwe_moe_ls_for_clip", *TINY, "method.alpha=-1"], cwd=tmp_path)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "fusion_bench: error: pwe_moe: option 'alpha' must be in (0, inf]; got -1"
    )
    proc = run_cli(
        ["method=pwe_moe/pwe_moe_ls_for_clip", TINY[0], "taskpool=dummy", f"method.plot_path={tmp_path / 'f.png'}"],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "pwe_moe: option 'plot_path' needs a task pool that evaluates tasks" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "f.png").exists()


def test_cli_on_the_mini_benchmark(tmp_path):
    """The eight mini tasks, two training steps, the reference's evaluation grid (the eight one-hot preferences),
    one batch of test images per task."""
    args = [
        "method=pwe_moe/pwe_moe_ls_for_clip",
        "modelpool=CLIPVisionModelPool/mini-clip_TA8",
        "taskpool=CLIPVisionModelTaskPool/mini-clip_TA8",
        "taskpool.fast_dev_run=true",
        "taskpool.dataloader_kwargs.batch_size=25",
        "method.num_steps=2",
        "method.dataloader_kwargs.batch_size=4",
        f"method.plot_path={tmp_path / 'front.pdf'}",
        f"report_save_path={tmp_path / 'r.json'}",
    ]
    proc = run_cli(args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    tasks = list(report["pwe_moe"]["returned_preference"])
    assert len(tasks) == 8 and report["pwe_moe"]["returned_preference"][tasks[0]] == pytest.approx(1 / 8)
    front = report["pwe_moe"]["pareto_front"]
    assert [[e["preference"][t] for t in tasks] for e in front] == np.eye(8).tolist()
    assert all(set(e["tasks"]) == set(tasks) for e in front)
    assert (tmp_path / "front.pdf").read_bytes()[:5] == b"%PDF-"
