"""Continual merging (OPCM and the sequential baselines): exact values on hand-made tensors, the order
option, and a run through the program with per-step evaluation and the plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import run_cli

from fusion_bench.errors import ConfigError
from fusion_bench.method.continual.base import merge_order
from fusion_bench.method.continual.continual_simple_average import continual_simple_average_steps
from fusion_bench.method.continual.continual_task_arithmetic import continual_task_arithmetic_steps
from fusion_bench.method.continual.continual_ties_merging import continual_ties_merging_steps
from fusion_bench.method.continual.opcm import OPCMAlgorithm, opcm_project, opcm_split_rank, opcm_steps

D = torch.float64


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=D)


# ---- OPCM -------------------------------------------------------------------------------------------


def test_split_rank_is_the_first_index_past_alpha():
    s = t([4.0, 3.0, 2.0, 1.0])  # cumulative shares 0.4, 0.7, 0.9, 1.0
    assert [opcm_split_rank(s, a) for a in (0.3, 0.5, 0.8, 0.95)] == [0, 1, 2, 3]
    assert opcm_split_rank(t([0.0, 0.0]), 0.5) == 0  # no singular value: nothing protected


def test_projection_removes_the_diagonal_and_the_protected_block():
    merged = torch.diag(t([4.0, 3.0, 2.0, 1.0]))  # U = V = I: the projection acts on the entries themselves
    task = t([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    # alpha 0.5 -> r = 1: only the diagonal goes (the 1x1 block is on it)
    expected = t([[0, 2, 3, 4], [5, 0, 7, 8], [9, 10, 0, 12], [13, 14, 15, 0]])
    assert torch.allclose(opcm_project(merged, task, 0.5), expected, atol=1e-12)
    # alpha 0.8 -> r = 2: the top-left 2x2 block goes too
    expected = t([[0, 0, 3, 4], [0, 0, 7, 8], [9, 10, 0, 12], [13, 14, 15, 0]])
    assert torch.allclose(opcm_project(merged, task, 0.8), expected, atol=1e-12)


def test_projection_of_a_wide_matrix_keeps_the_null_space_columns():
    merged = t([[2, 0, 0], [0, 1, 0]])  # s = (2, 1), V completed by e3 (full matrices)
    task = t([[1, 2, 3], [4, 5, 6]])
    assert torch.allclose(opcm_project(merged, task, 0.5), t([[0, 2, 3], [4, 0, 6]]), atol=1e-12)


def test_opcm_steps_rescale_to_the_average_task_vector_norm():
    base = {"lin": torch.zeros(2, 2, dtype=D), "bias": torch.zeros(2, dtype=D)}
    models = [
        {"lin": t([[4, 0], [0, 3]]), "bias": t([0, 0])},  # ‖τ1‖ = 5
        {"lin": t([[1, 2], [2, 4]]), "bias": t([0, 0])},  # ‖τ2‖ = 5; projected on diag(4, 3): [[0, 2], [2, 0]]
        {"lin": t([[0, 0], [0, 0]]), "bias": t([3, 4])},  # ‖τ3‖ = 5; the bias is not projected
    ]
    steps = list(opcm_steps(base, models, alpha=0.5, linear_keys={"lin"}))
    assert torch.equal(steps[0]["lin"], models[0]["lin"]) and torch.equal(steps[0]["bias"], models[0]["bias"])
    # step 2: S = τ1 + cleaned = [[4, 2], [2, 3]], ‖S‖ = √33, average norm 5
    assert torch.allclose(steps[1]["lin"], t([[4, 2], [2, 3]]) * 5 / math.sqrt(33), atol=1e-12)
    assert torch.allclose(steps[1]["bias"], t([0, 0]), atol=1e-12)
    # step 3: λ2 = √33 / 5 undoes the rescaling: S = [[4, 2], [2, 3]] and bias (3, 4), ‖S‖ = √58
    assert torch.allclose(steps[2]["lin"], t([[4, 2], [2, 3]]) * 5 / math.sqrt(58), atol=1e-12)
    assert torch.allclose(steps[2]["bias"], t([3, 4]) * 5 / math.sqrt(58), atol=1e-12)


def test_opcm_frozen_parameters_take_no_new_task_and_are_rescaled():
    base = {"w": t([0.0, 0.0]), "cls": t([0.0])}
    models = [{"w": t([3.0, 0.0]), "cls": t([4.0])}, {"w": t([0.0, 3.0]), "cls": t([4.0])}]  # both norms 5
    frozen = list(opcm_steps(base, models, linear_keys=set(), frozen_keys={"cls"}))[1]
    # S = (3, 3) and cls keeps τ̄ = 4 (the reference's class_embedding): ‖S‖ = √34, average norm 5
    assert torch.allclose(frozen["w"], t([3.0, 3.0]) * 5 / math.sqrt(34), atol=1e-12)
    assert torch.allclose(frozen["cls"], t([4.0]) * 5 / math.sqrt(34), atol=1e-12)
    merged = list(opcm_steps(base, models, linear_keys=set()))[1]  # cls merged too: 4 + 4, ‖S‖ = √82
    assert torch.allclose(merged["cls"], t([8.0]) * 5 / math.sqrt(82), atol=1e-12)


def test_opcm_keeps_theta0_where_the_sum_of_updates_is_zero():
    base = {"w": t([1.0, 1.0])}
    steps = list(opcm_steps(base, [{"w": t([2.0, 1.0])}, {"w": t([0.0, 1.0])}], linear_keys=set()))
    assert torch.equal(steps[1]["w"], t([1.0, 1.0]))


# ---- sequential baselines -------------------------------------------------------------------------


def test_continual_task_arithmetic_adds_one_scaled_task_vector_per_step():
    base = {"w": t([1.0, 1.0])}
    steps = list(
        continual_task_arithmetic_steps(base, [{"w": t([2.0, 1.0])}, {"w": t([1.0, 3.0])}], scaling_factor=0.5)
    )
    assert [s["w"].tolist() for s in steps] == [[1.5, 1.0], [1.5, 2.0]]


def test_continual_average_is_the_running_mean():
    models = [{"w": t([2.0, 0.0])}, {"w": t([4.0, 2.0])}, {"w": t([0.0, 4.0])}]
    assert [s["w"].tolist() for s in continual_simple_average_steps(models)] == [[2.0, 0.0], [3.0, 1.0], [2.0, 2.0]]


@pytest.mark.parametrize(
    "threshold, second",
    [
        # keep all: signs of [-0.5, -1.5, 2.5]; agreeing sums -1, -1 - 0.5, 1.5 + 1
        (100, [0.5 - 0.5 * 1.0, -1.0 - 0.5 * 1.5, 1.5 + 0.5 * 2.5]),
        # keep the top half (k = 3 - int(1.5) = 2nd smallest |v|): merged tv [0, -1, 1.5], task [-1, 0, 1]
        (50, [0.5 - 0.5 * 1.0, -1.0 - 0.5 * 1.0, 1.5 + 0.5 * 2.5]),
    ],
)
def test_continual_ties_merges_the_new_task_vector_with_the_running_one(threshold, second):
    base = {"w": t([0.0, 0.0, 0.0])}
    models = [{"w": t([1.0, -2.0, 3.0])}, {"w": t([-1.0, -0.5, 1.0])}]
    steps = list(continual_ties_merging_steps(base, models, scaling_factor=0.5, threshold=threshold))
    assert steps[0]["w"].tolist() == [0.5, -1.0, 1.5]
    assert torch.allclose(steps[1]["w"], t(second), atol=1e-12)


# ---- the order ------------------------------------------------------------------------------------

NAMES = ["a", "b", "c", "d"]


def test_order_explicit_pool_or_seeded_shuffle():
    assert merge_order("m", NAMES, task_order=["c", "a", "d", "b"], shuffle_order=True, seed=1) == ["c", "a", "d", "b"]
    assert merge_order("m", NAMES, task_order=None, shuffle_order=False, seed=None) == NAMES
    # Python's random.Random(0).shuffle, the order the reference draws after seeding with 0
    assert merge_order("m", NAMES, task_order=None, shuffle_order=True, seed=0) == ["c", "a", "b", "d"]
    assert merge_order("m", NAMES, task_order=None, shuffle_order=True, seed=0) == merge_order(
        "m", NAMES, task_order=None, shuffle_order=True, seed=0
    )


@pytest.mark.parametrize(
    "order, message",
    [
        (["a", "b", "c", "x"], r"names 'x', not a model of the pool"),
        (["a", "a", "b", "c", "d"], r"lists 'a' more than once"),
        (["a", "b"], r"leaves out \['c', 'd'\]"),
    ],
)
def test_a_wrong_order_is_refused(order, message):
    with pytest.raises(ConfigError, match=message):
        merge_order("opcm", NAMES, task_order=order, shuffle_order=False, seed=None)


def test_bad_options_are_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match=r"opcm: option 'alpha' must be in \[0, 1\]"):
        OPCMAlgorithm(alpha=1.5)
    with pytest.raises(ConfigError, match=r"'plot_path' must end in .png, .pdf, .svg"):
        OPCMAlgorithm(plot_path=str(tmp_path / "curve.txt"))
    with pytest.raises(ConfigError, match=r"'plot_path' needs evaluate_on_every_step=true"):
        OPCMAlgorithm(plot_path=str(tmp_path / "curve.png"), evaluate_on_every_step=False)
    with pytest.raises(ConfigError, match=r"'task_order' must be a list"):
        OPCMAlgorithm(task_order="a,b")


# ---- through the CLI -------------------------------------------------------------------------------

TINY = ["modelpool=CLIPVisionModelPool/tiny-clip_example", "taskpool=CLIPVisionModelTaskPool/tiny-clip_example"]


@pytest.mark.parametrize("method", ["opcm/opcm", "opcm/task_arithmetic", "opcm/ties_merging", "opcm/weight_average"])
def test_continual_methods_report_every_step_and_plot(tiny_example, tmp_path, method):
    order = ["svhn", "mnist", "eurosat"]
    proc = run_cli(
        [
            f"method={method}",
            *TINY,
            f"method.task_order=[{','.join(order)}]",
            f"method.plot_path={tmp_path / 'curve.png'}",
            f"report_save_path={tmp_path / 'r.json'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    continual = report["continual"]
    assert continual["order"] == order
    assert [s["merged"] for s in continual["steps"]] == [order[:1], order[:2], order]
    for step in continual["steps"]:
        seen = [step["tasks"][n]["accuracy"] for n in step["merged"]]
        assert step["seen"]["accuracy"] == pytest.approx(sum(seen) / len(seen))
    last = continual["steps"][-1]
    assert all(last["tasks"][n]["accuracy"] == report[n]["accuracy"] for n in order)  # the returned model
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_a_task_pool_is_refused(tiny_example, tmp_path):
    proc = run_cli(
        ["method=opcm/opcm", TINY[0], "taskpool=dummy", f"method.plot_path={tmp_path / 'c.png'}"], cwd=tmp_path
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("fusion_bench: error: opcm: option 'plot_path' needs")
    assert not (tmp_path / "c.png").exists()
