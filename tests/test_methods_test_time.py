"""Test-time merging: AdaMerging (task-wise, layer-wise), Concrete task arithmetic, Concrete layer-wise AdaMerging.

Oracles are computed here, independently of the code under test: merged weights from the checkpoints read by
transformers and the saved coefficients/masks (numpy, float64), gradients by hand on a one-layer model, and the
entropy objective over whole test sets with the plain formula.
"""

from __future__ import annotations

import json

import lightning
import numpy as np
import pytest
import torch
from conftest import run_cli
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench.errors import ConfigError, ModelLoadError
from fusion_bench.method import (
    CLIPLayerWiseAdaMergingAlgorithm,
    CLIPTaskWiseAdaMergingAlgorithm,
    ConcreteLayerWiseAdaMergingAlgorithm,
    ConcreteTaskArithmeticAlgorithm,
)
from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers, SeededBatchStream
from fusion_bench.modelpool import CLIPVisionModelPool
from fusion_bench.models.concrete_mask import rescale_mask, sample_concrete_mask, threshold_mask
from fusion_bench.models.functional_merge import (
    FunctionalMergedModel,
    TaskVectorStack,
    backward_into_merge,
    detached_leaves,
    merge_parameters,
    unload,
)
from fusion_bench.models.hf_clip import vision_state_dict
from fusion_bench.utils.checkpoint import load_checkpoint

TINY = ["modelpool=CLIPVisionModelPool/tiny-clip_example", "taskpool=CLIPVisionModelTaskPool/tiny-clip_example"]
FAST = {"batch_size": 8, "resume": False}  # small batches on the 40-image test sets; no checkpoint files


# ---- fixtures and oracles --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool(tiny_example) -> CLIPVisionModelPool:
    models = {"_pretrained_": str(tiny_example.base_model), **{t: str(p) for t, p in tiny_example.finetuned.items()}}
    return CLIPVisionModelPool(
        models, test_datasets={t: {"path": str(p), "split": "test"} for t, p in tiny_example.datasets.items()}
    )


@pytest.fixture(scope="module")
def weights(tiny_example) -> dict[str, dict[str, np.ndarray]]:
    """Canonical float64 state dicts read by transformers: ``_pretrained_`` and each fine-tuned model."""
    paths = {"_pretrained_": tiny_example.base_model, **tiny_example.finetuned}
    return {
        n: {k: v.double().numpy() for k, v in vision_state_dict(CLIPVisionModel.from_pretrained(p)).items()}
        for n, p in paths.items()
    }


def canonical(name: str) -> str:
    return name[len("vision_model.") :] if name.startswith("vision_model.") else name


def expected_merge(
    weights, lam: np.ndarray, names: list[str], mask: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """θ0 + m ⊙ Σ_t λ[t, k] τ_t for every parameter ``names[k]`` (λ: (T,) or (T, L))."""
    tasks = [t for t in weights if t != "_pretrained_"]
    lam = np.repeat(lam[:, None], len(names), axis=1) if lam.ndim == 1 else lam
    out = {}
    for k, name in enumerate(names):
        key = canonical(name)
        base = weights["_pretrained_"][key]
        delta = sum(lam[t, k] * (weights[task][key] - base) for t, task in enumerate(tasks))
        out[key] = base + (delta if mask is None else mask[name] * delta)
    return out


def assert_model_equals(model: nn.Module, expected: dict[str, np.ndarray], atol: float = 2e-6) -> None:
    got = vision_state_dict(model)
    for key, value in expected.items():
        np.testing.assert_allclose(got[key].double().numpy(), value, atol=atol, rtol=0, err_msg=key)


@torch.no_grad()
def entropy_on_test_sets(pool, model: nn.Module) -> float:
    """The objective on whole test sets: Σ_tasks mean_b −Σ_c p log(p + 1e-8), written out here."""
    heads = CLIPTaskClassifiers(pool, head_cache_dir=None)
    total = 0.0
    for task in pool.model_names:
        pixels, _ = next(iter(heads.loader(heads.dataset("test", task), batch_size=1000)))
        p = heads.classifier(model.eval(), task)(pixels).double().softmax(-1)
        total += float((-(p * torch.log(p + 1e-8)).sum(-1)).mean())
    return total


def cpu_fabric(tmp_path=None):
    from lightning.fabric.loggers import CSVLogger

    loggers = [CSVLogger(root_dir=str(tmp_path), name="tta")] if tmp_path is not None else []
    return lightning.Fabric(accelerator="cpu", devices=1, loggers=loggers)


def run(method, pool, tmp_path=None):
    method.fabric = cpu_fabric(tmp_path)
    return method.run(pool)


# ---- the functional merged model on one linear layer ------------------------------------------------------
THETA0_W, THETA0_B = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [0.0, 0.5, -0.5]  # nn.Linear(2, 3)
TAU_W = [[[1.0, 2.0], [0.0, 0.0], [-1.0, 0.0]], [[0.0, 1.0], [3.0, 0.0], [0.0, -2.0]]]
TAU_B = [[1.0, 0.0, 0.0], [0.0, -1.0, 2.0]]


def linear_stack() -> tuple[nn.Linear, TaskVectorStack]:
    layer = nn.Linear(2, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(THETA0_W))
        layer.bias.copy_(torch.tensor(THETA0_B))
    base = {"weight": layer.weight.detach(), "bias": layer.bias.detach()}
    vectors = {"weight": torch.tensor(TAU_W), "bias": torch.tensor(TAU_B)}  # (T=2, *shape)
    return layer, TaskVectorStack(("a", "b"), ("weight", "bias"), base, vectors)


def test_merge_is_the_closed_form_and_gradients_reach_the_coefficients():
    layer, stack = linear_stack()
    lam = torch.tensor([[0.5, -1.0], [2.0, 0.25]], requires_grad=True)  # (T, L): columns weight, bias
    merged = merge_parameters(stack, lam)
    w = np.array(THETA0_W) + 0.5 * np.array(TAU_W[0]) + 2.0 * np.array(TAU_W[1])
    b = np.array(THETA0_B) - 1.0 * np.array(TAU_B[0]) + 0.25 * np.array(TAU_B[1])
    np.testing.assert_allclose(merged["weight"].detach().numpy(), w)
    np.testing.assert_allclose(merged["bias"].detach().numpy(), b)
    # task-wise λ = (0.3, 0.3) is task arithmetic; a clamp bounds λ first; a mask scales each task vector sum
    ta = merge_parameters(stack, torch.tensor([0.3, 0.3]))
    np.testing.assert_allclose(
        ta["bias"].numpy(), np.array(THETA0_B) + 0.3 * (np.array(TAU_B[0]) + np.array(TAU_B[1])), atol=1e-7
    )
    clamped = merge_parameters(stack, torch.tensor([-1.0, 2.0]), clamp=(0.0, 1.0))
    np.testing.assert_allclose(clamped["bias"].numpy(), np.array(THETA0_B) + np.array(TAU_B[1]))
    mask = {"weight": torch.ones(3, 2), "bias": torch.tensor([0.0, 2.0, 1.0])}
    masked = merge_parameters(stack, torch.tensor([1.0, 1.0]), mask)
    np.testing.assert_allclose(
        masked["bias"].numpy(),
        np.array(THETA0_B) + np.array([0.0, 2.0, 1.0]) * (np.array(TAU_B[0]) + np.array(TAU_B[1])),
    )

    # two "tasks" with their own inputs; L = Σ_t sum((W x_t + b)²), each backward pass on its own
    model = FunctionalMergedModel(layer)
    xs = [torch.tensor([[1.0, -1.0]]), torch.tensor([[0.5, 2.0], [1.0, 0.0]])]
    leaves = detached_leaves(merged)
    model.use(leaves)
    for x in xs:
        (model(x) ** 2).sum().backward()
    backward_into_merge(merged, leaves)
    # by hand: ∂L/∂W = Σ 2 (W x + b) xᵀ, ∂L/∂b = Σ 2 (W x + b); ∂L/∂λ[t, k] = <∂L/∂θ_k, τ_{t,k}>
    gw, gb = np.zeros((3, 2)), np.zeros(3)
    for x in xs:
        for row in x.numpy():
            out = w @ row + b
            gw += 2 * np.outer(out, row)
            gb += 2 * out
    expected = np.array([[np.sum(gw * np.array(TAU_W[t])), np.sum(gb * np.array(TAU_B[t]))] for t in range(2)])
    np.testing.assert_allclose(lam.grad.numpy(), expected, rtol=1e-5)
    np.testing.assert_array_equal(layer.weight.detach().numpy(), np.array(THETA0_W, dtype=np.float32))  # θ0 untouched
    model.use(None)
    with pytest.raises(RuntimeError, match="call use"):
        model(xs[0])
    out = unload(layer, {k: v.detach() for k, v in merged.items()})
    np.testing.assert_allclose(out.bias.detach().numpy(), b, rtol=1e-6)


def test_concrete_mask_draws_and_rescaling():
    logits = {"w": torch.tensor([[-2.0, 0.0], [0.0, 3.0]])}
    mask = sample_concrete_mask(logits, 0.5, torch.Generator().manual_seed(3))
    u = torch.rand(2, 2, generator=torch.Generator().manual_seed(3))
    expected = torch.sigmoid((logits["w"] + torch.log(u) - torch.log(1 - u)) / 0.5)  # relaxed Bernoulli, by hand
    assert torch.allclose(mask["w"], expected, atol=1e-6)
    assert threshold_mask(logits)["w"].tolist() == [[0.0, 1.0], [1.0, 1.0]]  # keep probability ≥ 0.5
    rescaled = rescale_mask({"a": torch.tensor([0.0, 1.0, 1.0, 2.0]), "z": torch.zeros(3)})
    assert rescaled["a"].tolist() == [0.0, 1.0, 1.0, 2.0] and rescaled["z"].tolist() == [0.0, 0.0, 0.0]
    rescaled = rescale_mask({"a": torch.tensor([1.0, 3.0])})
    assert rescaled["a"].tolist() == [0.5, 1.5]


def test_seeded_batch_stream_resumes_exactly():
    full = iter(SeededBatchStream(10, 4, seed=5))
    batches = [next(full) for _ in range(9)]  # 3 batches per epoch (4, 4, 2)
    assert [len(b) for b in batches[:3]] == [4, 4, 2] and sorted(sum(batches[:3], [])) == list(range(10))
    assert sum(batches[:3], []) != sum(batches[3:6], [])  # reshuffled every epoch
    resumed = iter(SeededBatchStream(10, 4, seed=5, start=4))
    assert [next(resumed) for _ in range(5)] == batches[4:]


# ---- AdaMerging end to end ----------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [CLIPTaskWiseAdaMergingAlgorithm, CLIPLayerWiseAdaMergingAlgorithm])
def test_adamerging_lowers_the_entropy_and_returns_the_learned_merge(cls, pool, weights, tmp_path):
    from fusion_bench.method.task_vector.task_arithmetic import TaskArithmeticAlgorithm

    path = tmp_path / "w.pt"
    method = cls(max_steps=20, lr=0.1, save_merging_weights=str(path), **FAST)
    model = run(method, pool)
    saved = load_checkpoint(path)
    lam = saved["merging_weights"].double().numpy()
    assert saved["meta"]["models"] == ["mnist", "eurosat", "svhn"] and saved["meta"]["method"] == cls.name
    assert lam.shape == ((3,) if cls is CLIPTaskWiseAdaMergingAlgorithm else (3, len(saved["parameter_names"])))
    assert_model_equals(model, expected_merge(weights, lam, saved["parameter_names"]))
    assert np.abs(lam - 0.3).max() > 0.01  # the coefficients moved from their start
    start = entropy_on_test_sets(pool, TaskArithmeticAlgorithm(0.3).run(pool))  # λ = 0.3 everywhere: the starting point
    assert entropy_on_test_sets(pool, model) < start - 0.02
    report = method.extra_report()[cls.name]
    assert (
        report["num_steps"] == 20
        and report["objective"]["adamerging"]["last"] < report["objective"]["adamerging"]["first"]
    )
    per_model = lam if lam.ndim == 1 else lam.mean(axis=1)
    key = "merging_weights" if lam.ndim == 1 else "merging_weights_mean"
    assert list(report[key]) == ["mnist", "eurosat", "svhn"] and np.allclose(list(report[key].values()), per_model)

    # deterministic under the seed; weights= reproduces the model without data and without training
    again = cls(max_steps=20, lr=0.1, **FAST)
    run(again, pool)
    assert torch.equal(again.merging_weights, method.merging_weights)
    no_data = CLIPVisionModelPool({n: pool.get_model_config(n) for n in pool.all_model_names})
    reused = cls(weights=str(path))
    assert_model_equals(run(reused, no_data), expected_merge(weights, lam, saved["parameter_names"]))
    assert reused.history == {}


def test_clamped_task_wise_weights_stay_in_the_unit_interval(pool):
    method = CLIPTaskWiseAdaMergingAlgorithm(max_steps=5, lr=1.0, clamp_weights=True, **FAST)
    run(method, pool)
    assert method.merging_weights.min() >= 0.0 and method.merging_weights.max() <= 1.0
    assert set(method.merging_weights.tolist()) & {0.0, 1.0}  # lr 1 pushes some to a bound


def test_weights_files_are_refused_for_another_pool_variant_or_architecture(pool, tiny_example, tmp_path):
    path = tmp_path / "w.pt"
    run(CLIPLayerWiseAdaMergingAlgorithm(max_steps=1, save_merging_weights=str(path), **FAST), pool)
    two = CLIPVisionModelPool({n: pool.get_model_config(n) for n in ["_pretrained_", "mnist", "svhn"]})
    with pytest.raises(
        ConfigError,
        match=r"clip_layer_wise_adamerging: weights: '.*w.pt' was made for models "
        r"\['mnist', 'eurosat', 'svhn'\], not \['mnist', 'svhn'\]",
    ):
        run(CLIPLayerWiseAdaMergingAlgorithm(weights=str(path)), two)
    with pytest.raises(
        ConfigError, match=r"was made for method 'clip_layer_wise_adamerging', not 'clip_task_wise_adamerging'"
    ):
        run(CLIPTaskWiseAdaMergingAlgorithm(weights=str(path)), pool)
    config = CLIPVisionConfig.from_pretrained(tiny_example.finetuned["mnist"])
    config.num_hidden_layers = 1
    other = CLIPVisionModelPool({n: CLIPVisionModel(config) for n in pool.all_model_names})
    with pytest.raises(ConfigError, match=r"weights '.*w.pt' were made for another model architecture"):
        run(CLIPLayerWiseAdaMergingAlgorithm(weights=str(path)), other)
    run(ConcreteTaskArithmeticAlgorithm(max_steps=1, save_mask=str(tmp_path / "m.pt"), **FAST), pool)
    with pytest.raises(ConfigError, match=r"mask_checkpoint '.*m.pt' was made for another model architecture"):
        run(ConcreteTaskArithmeticAlgorithm(mask_checkpoint=str(tmp_path / "m.pt")), other)
    with pytest.raises(
        ConfigError, match=r"mask_checkpoint: '.*m.pt' was made for models \['mnist', 'eurosat', 'svhn'\]"
    ):
        run(ConcreteTaskArithmeticAlgorithm(mask_checkpoint=str(tmp_path / "m.pt")), two)
    with pytest.raises(
        ConfigError, match=r"option 'weights' has 2 numbers; the pool has 3 models \['mnist', 'eurosat', 'svhn'\]"
    ):
        run(CLIPTaskWiseAdaMergingAlgorithm(weights=[0.1, 0.2]), pool)
    with pytest.raises(ModelLoadError, match=r"clip_task_wise_adamerging: weights: no file '.*missing.pt'"):
        run(CLIPTaskWiseAdaMergingAlgorithm(weights=str(tmp_path / "missing.pt")), pool)


def test_bad_options_and_a_model_without_its_test_dataset(pool, tiny_example):
    with pytest.raises(
        ConfigError, match=r"clip_task_wise_adamerging: option 'optimizer' must be one of 'adam', 'sgd'; got 'rmsprop'"
    ):
        CLIPTaskWiseAdaMergingAlgorithm(optimizer="rmsprop")
    with pytest.raises(
        ConfigError,
        match=r"clip_concrete_task_arithmetic: option 'eval_mask_type' must be one of "
        r"'continuous', 'discrete', 'threshold'; got 'soft'",
    ):
        ConcreteTaskArithmeticAlgorithm(eval_mask_type="soft")
    with pytest.raises(
        ConfigError, match=r"clip_concrete_layer_wise_adamerging: option 'inner_lambda' must be one of 'carry', 'reset'"
    ):
        ConcreteLayerWiseAdaMergingAlgorithm(inner_lambda="first")
    with pytest.raises(ConfigError, match=r"option 'max_steps' must be an integer >= 1; got 0"):
        CLIPLayerWiseAdaMergingAlgorithm(max_steps=0)
    partial = CLIPVisionModelPool(
        {n: pool.get_model_config(n) for n in pool.all_model_names},
        test_datasets={"mnist": {"path": str(tiny_example.datasets["mnist"]), "split": "test"}},
    )
    for method in (
        CLIPLayerWiseAdaMergingAlgorithm(),
        ConcreteTaskArithmeticAlgorithm(),
        ConcreteLayerWiseAdaMergingAlgorithm(),
    ):
        with pytest.raises(
            ConfigError,
            match=rf"{method.name}: model\(s\) \['eurosat', 'svhn'\] have no test dataset in the pool "
            r"\(test datasets: mnist\); add them under the pool's test_datasets",
        ):
            run(method, partial)


def test_heads_of_tasks_without_built_in_class_names_come_from_task_text(pool, tiny_example):
    models = {"_pretrained_": str(tiny_example.base_model), "digits": str(tiny_example.finetuned["mnist"])}
    custom = CLIPVisionModelPool(
        models, test_datasets={"digits": {"path": str(tiny_example.datasets["mnist"]), "split": "test"}}
    )
    with pytest.raises(
        ConfigError, match=r"clip_task_wise_adamerging: no built-in class names for task 'digits' .*give 'classnames'"
    ):
        run(CLIPTaskWiseAdaMergingAlgorithm(max_steps=1, **FAST), custom)
    text = {"digits": {"classnames": tiny_example.tasks["mnist"], "templates": ['a photo of the number: "{}".']}}
    method = CLIPTaskWiseAdaMergingAlgorithm(max_steps=2, task_text=text, **FAST)
    run(method, custom)
    assert method.extra_report()["clip_task_wise_adamerging"]["num_steps"] == 2


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(pool, tmp_path):
    opts = dict(lr=0.05, batch_size=8, save_interval=2)
    straight = CLIPLayerWiseAdaMergingAlgorithm(max_steps=6, resume=False, **opts)
    run(straight, pool)
    first = CLIPLayerWiseAdaMergingAlgorithm(
        max_steps=3, checkpoint_dir=str(tmp_path / "ckpt"), **opts
    )  # "interrupted" at 3
    run(first, pool)
    (ckpt,) = (tmp_path / "ckpt").iterdir()
    assert ckpt.name.startswith("clip_layer_wise_adamerging-") and load_checkpoint(ckpt)["step"] == 3
    resumed = CLIPLayerWiseAdaMergingAlgorithm(max_steps=6, checkpoint_dir=str(tmp_path / "ckpt"), **opts)
    run(resumed, pool)
    assert resumed.resumed_at == 3 and len(resumed.history["adamerging"]) == 6 and len(resumed.step_seconds) == 3
    assert torch.equal(resumed.merging_weights, straight.merging_weights)
    assert resumed.history == straight.history
    other_lr = CLIPLayerWiseAdaMergingAlgorithm(
        max_steps=6, checkpoint_dir=str(tmp_path / "ckpt"), **{**opts, "lr": 0.01}
    )
    run(other_lr, pool)
    assert other_lr.resumed_at is None and len(list((tmp_path / "ckpt").iterdir())) == 2  # another run, another file


def test_checkpoints_and_logs_go_under_the_fabric_logger(pool, tmp_path):
    method = CLIPTaskWiseAdaMergingAlgorithm(max_steps=4, save_interval=2, batch_size=8)
    run(method, pool, tmp_path)
    (ckpt,) = (tmp_path / "tta" / "checkpoints").iterdir()
    assert load_checkpoint(ckpt)["step"] == 4
    rows = (tmp_path / "tta" / "version_0" / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["adamerging/loss", "step"] and len(rows) == 5
    again = CLIPTaskWiseAdaMergingAlgorithm(max_steps=4, save_interval=2, batch_size=8)
    run(again, pool, tmp_path)  # a finished run's checkpoint: the rerun skips the training
    assert (
        again.resumed_at == 4
        and again.step_seconds == []
        and torch.equal(again.merging_weights, method.merging_weights)
    )


# ---- Concrete subspace ---------------------------------------------------------------------------------------
def test_concrete_task_arithmetic_learns_a_mask_that_lowers_the_entropy(pool, weights, tmp_path):
    from fusion_bench.method.task_vector.task_arithmetic import TaskArithmeticAlgorithm

    method = ConcreteTaskArithmeticAlgorithm(
        max_steps=20, lr=0.5, eval_mask_type="threshold", save_mask=str(tmp_path / "m.pt"), **FAST
    )
    model = run(method, pool)
    logits = load_checkpoint(tmp_path / "m.pt")["mask_logits"]
    mask = {
        k: v.double().numpy() for k, v in rescale_mask(threshold_mask(logits)).items()
    }  # m / mean(m), m = [p ≥ 0.5]
    names = list(logits)
    assert_model_equals(model, expected_merge(weights, np.full(3, 0.3), names, mask))
    density = method.extra_report()["clip_concrete_task_arithmetic"]["mask_density"]
    assert 0.05 < density < 0.95 and density == pytest.approx(
        float(np.mean(np.concatenate([(v >= 0).numpy().ravel() for v in logits.values()])))
    )
    assert entropy_on_test_sets(pool, model) < entropy_on_test_sets(pool, TaskArithmeticAlgorithm(0.3).run(pool)) - 0.1
    reused = ConcreteTaskArithmeticAlgorithm(mask_checkpoint=str(tmp_path / "m.pt"), eval_mask_type="threshold")
    assert_model_equals(
        run(reused, CLIPVisionModelPool({n: pool.get_model_config(n) for n in pool.all_model_names})),
        expected_merge(weights, np.full(3, 0.3), names, mask),
    )


def test_concrete_layer_wise_adamerging_end_to_end(pool, weights, tmp_path):
    method = ConcreteLayerWiseAdaMergingAlgorithm(
        max_steps=6,
        max_adamerging_steps=6,
        lr=0.5,
        adamerging_lr=0.05,
        eval_mask_type="threshold",
        save_mask=str(tmp_path / "m.pt"),
        save_merging_weights=str(tmp_path / "w.pt"),
        **FAST,
    )
    model = run(method, pool)
    logits = load_checkpoint(tmp_path / "m.pt")["mask_logits"]
    saved = load_checkpoint(tmp_path / "w.pt")
    mask = {k: v.double().numpy() for k, v in rescale_mask(threshold_mask(logits)).items()}
    lam = saved["merging_weights"].double().numpy()
    assert lam.shape == (3, len(logits)) and np.abs(lam - 0.3).max() > 0.01
    assert_model_equals(model, expected_merge(weights, lam, saved["parameter_names"], mask))
    assert [len(v) for v in method.history.values()] == [6, 6] and list(method.history) == ["mask", "adamerging"]
    objective = method.extra_report()["clip_concrete_layer_wise_adamerging"]["objective"]
    assert set(objective) == {"mask", "adamerging"} and objective["adamerging"]["first"] == pytest.approx(
        np.mean(method.history["adamerging"])
    )
    first = entropy_on_test_sets(
        pool, run(ConcreteTaskArithmeticAlgorithm(max_steps=1, lr=1e-9, eval_mask_type="threshold", **FAST), pool)
    )
    assert entropy_on_test_sets(pool, model) < first - 0.1  # below the unmasked λ = 0.3 merge it started from


def test_concrete_layer_wise_adamerging_with_no_adamerging_step_merges_at_the_initial_lambda(pool, weights, tmp_path):
    options = {"max_steps": 3, "max_adamerging_steps": 0, "lr": 0.5, "eval_mask_type": "threshold"}
    method = ConcreteLayerWiseAdaMergingAlgorithm(save_mask=str(tmp_path / "m.pt"), **options, **FAST)
    model = run(method, pool)
    logits = load_checkpoint(tmp_path / "m.pt")["mask_logits"]
    mask = {k: v.double().numpy() for k, v in rescale_mask(threshold_mask(logits)).items()}
    assert_model_equals(model, expected_merge(weights, np.full(3, 0.3), list(logits), mask))  # θ0 + Σ λ0 (m̃ ⊙ τ)
    assert torch.equal(method.merging_weights, torch.full((3, len(logits)), 0.3))


def _adam(lam0: np.ndarray, grads: list[np.ndarray], lr: float, *, from_start: list[bool]) -> np.ndarray:
    """Adam (PyTorch defaults) by hand: one step per gradient; ``from_start[i]``: step i begins at ``lam0``."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    m, v, lam = np.zeros_like(lam0), np.zeros_like(lam0), lam0.copy()
    for i, g in enumerate(grads, start=1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        start = lam0 if from_start[i - 1] else lam
        lam = start - lr * (m / (1 - b1**i)) / (np.sqrt(v / (1 - b2**i)) + eps)
    return lam


@pytest.mark.parametrize("order", ["carry", "reset"])
def test_concrete_inner_step_order_on_a_linear_layer(order, monkeypatch):
    """Two mask steps on one linear layer with fixed masks and L(θ) = Σ_x ||W x + b||²: the inner λ by hand."""
    import fusion_bench.method.test_time.concrete_subspace as concrete

    _, stack = linear_stack()
    masks = [
        {"weight": torch.tensor([[1.0, 0.5], [0.0, 2.0], [1.5, 1.0]]), "bias": torch.tensor([0.5, 1.0, 1.5])},
        {"weight": torch.tensor([[0.2, 1.0], [1.0, 1.0], [2.0, 0.8]]), "bias": torch.tensor([1.0, 0.0, 2.0])},
    ]
    drawn = iter(masks)

    def sample(logits, temperature, generator):  # the step's fixed mask, tied to the logits with a zero gradient
        return {k: m + 0.0 * logits[k] for k, m in next(drawn).items()}

    monkeypatch.setattr(concrete, "sample_concrete_mask", sample)
    xs = np.array([[1.0, -1.0], [0.5, 2.0]])

    def loss(merged):  # the stand-in for the entropy: back-propagates into the merged tensors' inputs
        value = sum(((merged["weight"] @ torch.tensor(x, dtype=torch.float32) + merged["bias"]) ** 2).sum() for x in xs)
        value.backward()
        return value.item()

    method = ConcreteLayerWiseAdaMergingAlgorithm(inner_lambda=order, scaling_factor=0.3, base_lr=1.0)
    method.fabric = cpu_fabric()
    method.entropy_backward = loss
    bilevel = concrete._BiLevel(
        method, stack, {n: torch.zeros_like(stack.base[n], requires_grad=True) for n in stack.names}
    )
    for step in range(2):
        bilevel.mask_step(step, step)

    # by hand: θ_k = θ0_k + m̃_k ⊙ Σ_t λ[t, k] τ_{t,k} (m̃ = m / mean(m)); ∂L/∂λ[t, k] = <∂L/∂θ_k, m̃_k ⊙ τ_{t,k}>
    theta0 = {"weight": np.array(THETA0_W), "bias": np.array(THETA0_B)}
    tau = {"weight": np.array(TAU_W), "bias": np.array(TAU_B)}
    names = ["weight", "bias"]

    def grad(lam, mask):
        m = {k: mask[k].double().numpy() / mask[k].double().numpy().mean() for k in names}
        th = {k: theta0[k] + m[k] * sum(lam[t, j] * tau[k][t] for t in range(2)) for j, k in enumerate(names)}
        gw, gb = np.zeros((3, 2)), np.zeros(3)
        for x in xs:
            out = th["weight"] @ x + th["bias"]
            gw, gb = gw + 2 * np.outer(out, x), gb + 2 * out
        g = {"weight": gw, "bias": gb}
        return np.array([[np.sum(g[k] * m[k] * tau[k][t]) for k in names] for t in range(2)])

    lam0 = np.full((2, 2), 0.3)
    lam1 = _adam(lam0, [grad(lam0, masks[0])], 1.0, from_start=[True])
    carried = _adam(lam0, [grad(lam0, masks[0]), grad(lam1, masks[1])], 1.0, from_start=[True, True])
    reset_first = _adam(lam0, [grad(lam0, masks[0]), grad(lam0, masks[1])], 1.0, from_start=[True, True])
    assert np.abs(carried - reset_first).max() > 1e-3  # the two orders part at the second step
    expected = carried if order == "carry" else reset_first
    np.testing.assert_allclose(bilevel.lam.detach().double().numpy(), expected, rtol=1e-5, atol=1e-6)


# ---- the command line ------------------------------------------------------------------------------------------
def test_cli_adamerging_save_and_reuse_weights(tiny_example, tmp_path):
    args = [
        "method=adamerging",
        "method.name=clip_task_wise_adamerging",
        "method.max_steps=4",
        "method.devices=1",
        "method.batch_size=4",
        *TINY,
    ]
    proc = run_cli([*args, "method.save_merging_weights=w.pt", "report_save_path=r1.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    trained = json.loads((tmp_path / "r1.json").read_text())
    lam = load_checkpoint(tmp_path / "w.pt")["merging_weights"].tolist()
    assert list(trained["clip_task_wise_adamerging"]["merging_weights"].values()) == pytest.approx(lam)
    assert (tmp_path / "outputs" / "logs" / "fusion_bench" / "checkpoints").is_dir()
    proc = run_cli([*args, "method.weights=w.pt", "report_save_path=r2.json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    reused = json.loads((tmp_path / "r2.json").read_text())
    for task in ("mnist", "eurosat", "svhn", "average"):
        assert reused[task] == pytest.approx(trained[task])


def test_cli_concrete_layer_wise_adamerging(tiny_example, tmp_path):
    proc = run_cli(
        [
            "method=concrete_subspace/clip_concrete_layer_wise_adamerging",
            "method.max_steps=2",
            "method.max_adamerging_steps=2",
            "method.batch_size=4",
            *TINY,
            "report_save_path=r.json",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["clip_concrete_layer_wise_adamerging"]["num_steps"] == 4
    assert 0.0 <= report["average"]["accuracy"] <= 1.0 and set(report["meta"]["num_samples"]) == {
        "mnist",
        "eurosat",
        "svhn",
    }


def test_method_devices_sets_the_fabric_devices():
    from omegaconf import OmegaConf

    from fusion_bench.program import FabricModelFusionProgram

    cfg = OmegaConf.create(
        {"fabric": {"_target_": "lightning.Fabric", "devices": 1}, "method": {"name": "x", "devices": 4}}
    )
    assert FabricModelFusionProgram(cfg).fabric_config().devices == 4
    cfg.method.devices = None
    assert FabricModelFusionProgram(cfg).fabric_config().devices == 1


def test_a_checkpoint_made_against_other_heads_is_not_resumed(pool, tiny_example, tmp_path):
    """Same vision weights, another CLIP text side (a copy of the pre-trained CLIP with only its logit scale
    changed, as ``_pretrained_``): the entropy trained against differs, so the run starts over instead of
    taking the other run's coefficients."""
    from transformers import CLIPModel

    opts = dict(lr=0.05, batch_size=8, save_interval=2, max_steps=2, checkpoint_dir=str(tmp_path / "ckpt"))
    run(CLIPLayerWiseAdaMergingAlgorithm(**opts), pool)
    hotter = tmp_path / "clip-hotter"
    clip = CLIPModel.from_pretrained(str(tiny_example.base_model))
    with torch.no_grad():
        clip.logit_scale.add_(1.0)
    clip.save_pretrained(str(hotter))
    for file in tiny_example.base_model.iterdir():  # the processor's files
        if not (hotter / file.name).exists():
            (hotter / file.name).write_bytes(file.read_bytes())
    models = {n: pool.get_model_config(n) for n in pool.all_model_names}
    other_pool = CLIPVisionModelPool(
        {**models, "_pretrained_": str(hotter)},
        test_datasets={t: {"path": str(p), "split": "test"} for t, p in tiny_example.datasets.items()},
    )
    other = CLIPLayerWiseAdaMergingAlgorithm(**opts)
    run(other, other_pool)
    assert other.resumed_at is None and len(list((tmp_path / "ckpt").iterdir())) == 2
    same = CLIPLayerWiseAdaMergingAlgorithm(**opts)
    run(same, pool)
    assert same.resumed_at == 2
