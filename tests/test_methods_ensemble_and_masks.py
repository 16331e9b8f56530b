"""Output ensembles, MagMax, TALL masks (task known) and EMR-Merging: exact values on hand-made tensors
(worked out in the comments), task-conditioned evaluation in the CLIP task pool, and bad input."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fusion_bench.errors import ConfigError
from fusion_bench.method import (
    EMRMergingAlgorithm,
    MagMaxAlgorithm,
    MaxModelPredictorAlgorithm,
    SimpleEnsembleAlgorithm,
    TallMaskAlgorithm,
    WeightedEnsembleAlgorithm,
)
from fusion_bench.method.task_vector.emr_merging import emr_state_dicts
from fusion_bench.method.task_vector.magmax import magmax
from fusion_bench.method.task_vector.tall_mask_merging import tall_mask_state_dicts
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.models.ensemble import EnsembleCLIPVisionModel
from fusion_bench.models.task_conditioned import MaskedTaskVectorModel, check_tasks_covered, is_task_conditioned


# ---- output ensembles ------------------------------------------------------------------------------
class ConstantEncoder(nn.Module):
    """Returns fixed ``pooler_output`` / ``last_hidden_state`` rows for any batch (one learnable dummy)."""

    def __init__(self, pooled: list[float]) -> None:
        super().__init__()
        self.pooled = nn.Parameter(torch.tensor([pooled]), requires_grad=False)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        rows = self.pooled.expand(pixel_values.shape[0], -1)
        return SimpleNamespace(pooler_output=rows, last_hidden_state=rows.unsqueeze(1) * 2)


A_OUT, B_OUT = [1.0, -2.0, 3.0], [3.0, 0.0, -1.0]


def ensemble_pool() -> BaseModelPool:
    return BaseModelPool({"a": ConstantEncoder(A_OUT), "b": ConstantEncoder(B_OUT)})


@pytest.mark.parametrize(
    "algorithm, expected",
    [
        (SimpleEnsembleAlgorithm(), [2.0, -1.0, 1.0]),  # (A + B) / 2
        (WeightedEnsembleAlgorithm(), [2.0, -1.0, 1.0]),  # equal weights = the mean
        (WeightedEnsembleAlgorithm(weights=[1, 3]), [2.5, -0.5, 0.0]),  # 0.25 A + 0.75 B
        (WeightedEnsembleAlgorithm(weights=[1, 3], normalize=False), [10.0, -2.0, 0.0]),  # A + 3 B
        (MaxModelPredictorAlgorithm(), [3.0, 0.0, 3.0]),  # element-wise max
    ],
)
def test_ensembles_combine_the_outputs_exactly(algorithm, expected):
    model = algorithm.run(ensemble_pool())
    out = model(pixel_values=torch.zeros(2, 3, 4, 4))
    assert torch.equal(out.pooler_output, torch.tensor([expected, expected]))
    assert torch.equal(out.last_hidden_state, torch.tensor([expected, expected]).unsqueeze(1) * 2)


def test_weighted_ensemble_bad_weights():
    with pytest.raises(ConfigError, match=r"weighted_ensemble: option 'weights' has 3 entries but the pool has 2"):
        WeightedEnsembleAlgorithm(weights=[1, 2, 3]).run(ensemble_pool())
    with pytest.raises(ConfigError, match=r"weighted_ensemble: option 'weights' .* sums to 0"):
        WeightedEnsembleAlgorithm(weights=[1, -1])
    with pytest.raises(ConfigError, match="ensemble mode must be one of"):
        EnsembleCLIPVisionModel([ConstantEncoder(A_OUT)], mode="median")


# ---- MagMax -----------------------------------------------------------------------------------------
# θ0 = [1, 1, 1, 1]; three task vectors:
#   τA = [ 2,  -3, 0.5, -1]
#   τB = [-1,   3, -4,   1]
#   τC = [0.5,  1,  4,  -2]
# largest |τ| per entry, ties to the later task: [2 (A), 3 (B beats A's -3), 4 (C beats B's -4), -2 (C)]
BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
TVS = [torch.tensor([2.0, -3.0, 0.5, -1.0]), torch.tensor([-1.0, 3.0, -4.0, 1.0]), torch.tensor([0.5, 1.0, 4.0, -2.0])]


def vec_model(values: torch.Tensor) -> nn.Module:
    module = nn.Module()
    module.w = nn.Parameter(values.clone(), requires_grad=False)
    module.forward = lambda x: x * module.w  # for the task pool protocol tests
    return module


def vec_pool() -> BaseModelPool:
    return BaseModelPool({"_pretrained_": vec_model(BASE), **{n: vec_model(BASE + tv) for n, tv in zip("abc", TVS)}})


def test_magmax_exact():
    expected = torch.tensor([1 + 0.5 * 2, 1 + 0.5 * 3, 1 + 0.5 * 4, 1 + 0.5 * -2])  # θ0 + 0.5 τ_max
    merged = magmax({"w": BASE}, [{"w": BASE + tv} for tv in TVS], scaling_factor=0.5)
    assert torch.equal(merged["w"], expected)
    streamed = MagMaxAlgorithm().run(vec_pool())  # default λ = 0.5
    assert torch.equal(streamed.w.detach(), expected)
    assert torch.equal(MagMaxAlgorithm(scaling_factor=1.0).run(vec_pool()).w.detach(), torch.tensor([3.0, 4, 5, -1]))


# ---- TALL masks -------------------------------------------------------------------------------------
# Σ τ = [1.5, 1, 0.5, -2]; m_t = |τ_t| ≥ 0.6 |Σ − τ_t|:
#   A: |τA| = [2, 3, .5, 1]  vs 0.6·|[-.5, 4, 0, -1]| = [.3, 2.4, 0, .6]   -> [T, T, T, T]
#   B: |τB| = [1, 3, 4, 1]   vs 0.6·|[2.5, -2, 4.5, -3]| = [1.5, 1.2, 2.7, 1.8] -> [F, T, T, F]
#   C: |τC| = [.5, 1, 4, 2]  vs 0.6·|[1, 0, -3.5, 0]| = [.6, 0, 2.1, 0]   -> [F, T, T, T]
# model_t = θ0 + m_t ⊙ Σ τ
TALL_EXPECTED = {
    "a": torch.tensor([2.5, 2.0, 1.5, -1.0]),
    "b": torch.tensor([1.0, 2.0, 1.5, 1.0]),
    "c": torch.tensor([1.0, 2.0, 1.5, -1.0]),
}


def test_tall_mask_exact_per_task_models():
    in_memory = tall_mask_state_dicts({"w": BASE}, [{"w": BASE + tv} for tv in TVS], tall_mask_lambda=0.6)
    for sd, name in zip(in_memory, "abc"):
        assert torch.equal(sd["w"], TALL_EXPECTED[name]), name
    algorithm = TallMaskAlgorithm()  # λ = 0.6
    model = algorithm.run(vec_pool())
    assert is_task_conditioned(model) and model.task_names == ["a", "b", "c"]
    for name in "cab":  # any order: each switch starts again from θ0
        assert torch.equal(model.for_task(name).w.detach(), TALL_EXPECTED[name]), name
    assert algorithm.extra_report()["tall_mask_density"] == {"a": 1.0, "b": 0.5, "c": 0.75}


def test_tall_mask_per_task_lambdas_and_bad_options():
    # λ = [0.6, 0.3, 0.6]: B's threshold 0.3·[2.5, 2, 4.5, 3] = [.75, .6, 1.35, .9] -> all kept
    model = TallMaskAlgorithm(tall_mask_lambda=[0.6, 0.3, 0.6]).run(vec_pool())
    assert torch.equal(model.for_task("b").w.detach(), torch.tensor([2.5, 2.0, 1.5, -1.0]))
    with pytest.raises(ConfigError, match=r"tall_mask: option 'tall_mask_lambda' has 2 entries but the pool has 3"):
        TallMaskAlgorithm(tall_mask_lambda=[0.5, 0.5]).run(vec_pool())
    with pytest.raises(ConfigError, match=r"tall_mask: option 'tall_mask_lambda' must be in \[0, inf\]"):
        TallMaskAlgorithm(tall_mask_lambda=-1)


# ---- EMR-Merging ------------------------------------------------------------------------------------
# Σ τ = [1.5, 1, 0.5, -2] -> γ = [+, +, +, -]
# masks m_t = τ_t·γ > 0: A [T, F, T, T], B [F, T, F, F], C [T, T, T, T]
# τ_uni = γ · max_t |m_t τ_t| = [max(2, .5), max(3, 1), max(.5, 4), -max(1, 2)] = [2, 3, 4, -2]
# rescaler_t = mean|τ_t| / mean|m_t τ_uni| (one tensor):
#   A: (6.5/4) / ((2+4+2)/4) = 6.5/8      B: (9/4) / (3/4) = 3      C: (7.5/4) / (11/4) = 7.5/11
EMR_SCALES = {"a": 6.5 / 8, "b": 3.0, "c": 7.5 / 11}
EMR_MASKED = {
    "a": torch.tensor([2.0, 0.0, 4.0, -2.0]),
    "b": torch.tensor([0.0, 3.0, 0.0, 0.0]),
    "c": torch.tensor([2.0, 3.0, 4.0, -2.0]),
}


def test_emr_merging_exact():
    algorithm = EMRMergingAlgorithm()
    model = algorithm.run(vec_pool())
    scales = algorithm.extra_report()["emr_rescalers"]
    for name, value in EMR_SCALES.items():
        assert scales[name] == pytest.approx(value, rel=1e-6), name
    in_memory = emr_state_dicts({"w": BASE}, [{"w": BASE + tv} for tv in TVS])
    for t, name in enumerate("abc"):
        expected = BASE + EMR_MASKED[name] * torch.tensor(scales[name])
        assert torch.equal(model.for_task(name).w.detach(), expected), name
        assert torch.equal(in_memory[t]["w"], expected), name
        assert torch.allclose(expected, BASE + EMR_MASKED[name] * EMR_SCALES[name], rtol=1e-6, atol=0)


def test_emr_zero_sum_counts_as_negative_and_empty_task_is_an_error():
    # τA = [1, -1], τB = [-1, 1]: Σ = 0 -> γ = [-1, -1]; masks A [F, T], B [T, F]; τ_uni = [-1, -1]
    base = torch.zeros(2)
    pool = BaseModelPool(
        {
            "_pretrained_": vec_model(base),
            "a": vec_model(torch.tensor([1.0, -1])),
            "b": vec_model(torch.tensor([-1.0, 1])),
        }
    )
    model = EMRMergingAlgorithm().run(pool)
    assert torch.equal(model.for_task("a").w.detach(), torch.tensor([0.0, -2.0]))  # rescaler (2/2)/(1/2) = 2
    assert torch.equal(model.for_task("b").w.detach(), torch.tensor([-2.0, 0.0]))
    same = BaseModelPool(
        {"_pretrained_": vec_model(base), "a": vec_model(torch.tensor([1.0, 1])), "z": vec_model(base)}
    )
    with pytest.raises(ConfigError, match=r"emr_merging: model 'z': its mask keeps no non-zero entry"):
        EMRMergingAlgorithm().run(same)


# ---- the task-conditioned protocol --------------------------------------------------------------------
def test_masked_model_refuses_use_without_a_task_and_unknown_tasks():
    model = TallMaskAlgorithm().run(vec_pool())
    with pytest.raises(ConfigError, match=r"needs the task at inference: call for_task"):
        model(torch.ones(4))
    with pytest.raises(ConfigError, match=r"no model for task 'd'; known tasks: 'a', 'b', 'c'"):
        model.for_task("d")
    with pytest.raises(ConfigError, match=r"taskpool: .* no model for task\(s\) 'x', 'y'"):
        check_tasks_covered(model, ["a", "x", "y"])
    assert isinstance(model, MaskedTaskVectorModel) and not is_task_conditioned(nn.Linear(2, 2))


# ---- on the tiny CLIP: through the program, and evaluated by the CLIP task pool ------------------------
TINY_POOL = "modelpool=CLIPVisionModelPool/tiny-clip_example_model_only"
TINY_TASKPOOL = "taskpool=CLIPVisionModelTaskPool/tiny-clip_example"
NEW_METHODS = ["simple_ensemble", "weighted_ensemble", "max_model_predictor", "magmax", "tall_mask", "emr_merging"]


def run_program(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from fusion_bench.example import register_resolvers
    from fusion_bench.program import FabricModelFusionProgram
    from fusion_bench.scripts.cli import CONFIG_DIR

    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fusion_bench_config", overrides=overrides)
    program = FabricModelFusionProgram(cfg)
    return program.run(), program.model


def tiny_models(tiny_example) -> dict[str, nn.Module]:
    from fusion_bench.modelpool import CLIPVisionModelPool

    pool = CLIPVisionModelPool({"_pretrained_": str(tiny_example.base_model), **tiny_example.finetuned})
    return {name: pool.load_model(name).eval() for name in ["_pretrained_", *tiny_example.finetuned]}


@pytest.mark.parametrize("method", NEW_METHODS)
def test_new_methods_run_and_evaluate_on_the_tiny_clip(tiny_example, tmp_path, method):
    report, model = run_program([f"method={method}", TINY_POOL, TINY_TASKPOOL])
    tasks = list(tiny_example.datasets)
    assert all(0 <= report[t]["accuracy"] <= 1 for t in tasks)
    assert report["average"]["accuracy"] == pytest.approx(sum(report[t]["accuracy"] for t in tasks) / len(tasks))
    again, _ = run_program([f"method={method}", TINY_POOL, TINY_TASKPOOL])
    assert {t: again[t] for t in tasks} == {t: report[t] for t in tasks}, "not deterministic"


def test_ensemble_pooled_output_is_the_mean_of_the_experts(tiny_example):
    models = tiny_models(tiny_example)
    experts = [models[n] for n in tiny_example.finetuned]
    pool = BaseModelPool(dict(zip(tiny_example.finetuned, experts)))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    size = experts[0].config.image_size
    pixels = torch.nn.functional.interpolate(pixels, size=(size, size))
    with torch.no_grad():
        pooled = [m(pixel_values=pixels).pooler_output for m in experts]
        mean = SimpleEnsembleAlgorithm().run(pool)(pixel_values=pixels).pooler_output
        biggest = MaxModelPredictorAlgorithm().run(pool)(pixel_values=pixels).pooler_output
    assert torch.equal(mean, torch.stack(pooled).mean(0))
    assert torch.equal(biggest, torch.maximum(torch.maximum(pooled[0], pooled[1]), pooled[2]))


@pytest.mark.parametrize("method", ["tall_mask", "emr_merging"])
def test_task_pool_evaluates_each_task_with_its_own_model(tiny_example, tmp_path, method):
    from fusion_bench.taskpool import CLIPVisionModelTaskPool

    def taskpool() -> CLIPVisionModelTaskPool:
        return CLIPVisionModelTaskPool(
            test_datasets={t: {"path": str(p)} for t, p in tiny_example.datasets.items()},
            clip_model=str(tiny_example.base_model),
            dataloader_kwargs={"batch_size": 7},
            head_cache_dir=str(tmp_path / "heads"),
        )

    report, model = run_program([f"method={method}", TINY_POOL, "taskpool=dummy"])
    conditioned = taskpool().evaluate(model)
    for task in tiny_example.datasets:
        alone = taskpool().evaluate(model.for_task(task))  # the task's model as a plain encoder
        assert conditioned[task] == alone[task], task
    with pytest.raises(ConfigError, match=r"taskpool: .* no model for task\(s\) 'extra'"):
        CLIPVisionModelTaskPool(
            test_datasets={
                "extra": {
                    "path": str(tiny_example.datasets["mnist"]),
                    "classnames": [str(i) for i in range(10)],
                    "templates": ["a photo of {}."],
                }
            },
            clip_model=str(tiny_example.base_model),
            head_cache_dir=str(tmp_path / "heads"),
        ).evaluate(model)


@pytest.mark.parametrize("method", ["tall_mask", "simple_ensemble"])
def test_saving_writes_one_folder_per_task_or_member(tiny_example, tmp_path, method):
    import json

    from fusion_bench.modelpool import CLIPVisionModelPool
    from fusion_bench.models.hf_clip import vision_state_dict

    out = tmp_path / "saved"
    _, model = run_program([f"method={method}", TINY_POOL, "taskpool=dummy", f"merged_model_save_path={out}"])
    assert (out / "README.md").is_file()
    for name in tiny_example.finetuned:
        saved = vision_state_dict(CLIPVisionModelPool({"m": str(out / name)}).load_model("m"))
        expected = vision_state_dict(
            model.for_task(name) if method == "tall_mask" else model.model_list[model.member_names.index(name)]
        )
        assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved), name
    if method == "simple_ensemble":
        assert json.loads((out / "ensemble.json").read_text()) == {
            "mode": "mean",
            "weights": None,
            "members": list(tiny_example.finetuned),
        }


@pytest.mark.parametrize("method", ["tall_mask", "emr_merging"])
def test_program_refuses_a_task_pool_with_other_tasks_before_merging(tiny_example, method, monkeypatch):
    from hydra import compose, initialize_config_dir

    from fusion_bench.example import register_resolvers
    from fusion_bench.program import FabricModelFusionProgram
    from fusion_bench.scripts.cli import CONFIG_DIR

    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fusion_bench_config", overrides=[f"method={method}", TINY_POOL])  # mini-clip task pool
    algorithm = {"tall_mask": TallMaskAlgorithm, "emr_merging": EMRMergingAlgorithm}[method]
    monkeypatch.setattr(algorithm, "run", lambda *a: pytest.fail("merged before the check"))
    with pytest.raises(ConfigError, match=rf"method '{method}': .* no model for task\(s\) 'scenes', 'vehicles'"):
        FabricModelFusionProgram(cfg).run()
