"""AdaMerging + Representation Surgery: exact values of the surgery module, its update and the task-known
classifier on hand-made tensors; through the program on the tiny example."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import run_cli
from hydra import compose, initialize_config_dir
from torch import nn

from fusion_bench.errors import ConfigError
from fusion_bench.example import register_resolvers
from fusion_bench.method.test_time.adamerging_surgery import CLIPLayerWiseAdaMergingSurgeryAlgorithm, surgery_step
from fusion_bench.models.surgery import SurgeryEncoder, SurgeryModule
from fusion_bench.models.zero_shot import CLIPZeroShotClassifier
from fusion_bench.program import FabricModelFusionProgram
from fusion_bench.scripts.cli import CONFIG_DIR


def module(down, up) -> SurgeryModule:
    m = SurgeryModule(len(down[0]), len(down))
    with torch.no_grad():
        m.down.copy_(torch.tensor(down))
        m.up.copy_(torch.tensor(up))
    return m


def test_surgery_subtracts_the_mapped_bias():
    m = module([[1.0, 0.0], [0.0, -1.0]], [[1.0, 0.0], [2.0, 3.0]])
    # z = (2, 1): ReLU(W_down z) = (2, 0); W_up (2, 0) = (2, 4); z' = (0, -3)
    assert torch.allclose(m(torch.tensor([[2.0, 1.0]])), torch.tensor([[0.0, -3.0]]))
    fresh = SurgeryModule(4, 16, generator=torch.Generator().manual_seed(0))
    z = torch.randn(3, 4)
    assert torch.equal(fresh(z), z)  # W_up starts at 0


def test_one_surgery_step_follows_the_l1_gradient():
    m = module([[1.0, 0.0]], [[0.0], [0.0]])
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
    # z' = z = (2, 1), target (1, 1): loss (1 + 0) / 2; ∂L/∂z' = (0.5, 0); h = ReLU(2) = 2; ∂L/∂W_up = -(0.5, 0) h
    loss = surgery_step(m, optimizer, torch.tensor([[2.0, 1.0]]), torch.tensor([[1.0, 1.0]]))
    assert loss == 0.5
    assert torch.allclose(m.up, torch.tensor([[0.1], [0.0]]))
    assert torch.equal(m.down, torch.tensor([[1.0, 0.0]]))  # ∂L/∂h = -(0.5, 0) · W_up = 0 before the step


def test_the_classifier_applies_the_task_surgery_after_normalising():
    class Pooled(nn.Module):
        def forward(self, pixel_values):
            return SimpleNamespace(pooler_output=torch.tensor([[3.0, 4.0]]))

    projection = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        projection.weight.copy_(torch.eye(2))
    encoder = SurgeryEncoder(Pooled(), module([[1.0, 0.0]], [[1.0], [0.0]]))
    classifier = CLIPZeroShotClassifier(encoder, projection, torch.tensor(math.log(2.0)), torch.eye(2))
    # normalised (0.6, 0.8); surgery: (0.6, 0.8) - (1, 0) ReLU(0.6) = (0, 0.8); logits 2 · (0, 0.8)
    assert torch.allclose(classifier(torch.zeros(1, 3, 2, 2)), torch.tensor([[0.0, 1.6]]))


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match=r"option 'surgery_hidden_dim' must be an integer >= 1"):
        CLIPLayerWiseAdaMergingSurgeryAlgorithm(surgery_hidden_dim=0)
    with pytest.raises(ConfigError, match=r"option 'surgery_lr' must be in \(0, inf\]"):
        CLIPLayerWiseAdaMergingSurgeryAlgorithm(surgery_lr=0)


TINY = ["modelpool=CLIPVisionModelPool/tiny-clip_example", "taskpool=CLIPVisionModelTaskPool/tiny-clip_example"]


def run_program(overrides: list[str]) -> dict:
    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fusion_bench_config", overrides=overrides)
    return FabricModelFusionProgram(cfg).run()


def test_without_surgery_steps_it_is_layer_wise_adamerging(tiny_example, tmp_path):
    steps = ["method.max_steps=3", "method.batch_size=4", f"method.checkpoint_dir={tmp_path}"]
    surgery = run_program(["method=surgery/adamerging_surgery", *TINY, *steps, "method.surgery_steps=0"])
    plain = run_program(["method=adamerging", *TINY, *steps])
    for task in ("mnist", "eurosat", "svhn"):
        assert surgery[task] == plain[task]


def test_surgery_runs_from_the_cli_and_saves_its_modules(tiny_example, tmp_path):
    out = tmp_path / "merged"
    proc = run_cli(
        [
            "method=surgery/adamerging_surgery",
            *TINY,
            "method.max_steps=2",
            "method.surgery_steps=3",
            "method.batch_size=4",
            f"report_save_path={tmp_path / 'r.json'}",
            f"merged_model_save_path={out}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    training = report["clip_layer_wise_adamerging_surgery"]
    assert training["num_steps"] == 5 and set(training["objective"]) == {"adamerging", "surgery"}
    assert json.loads((out / "surgery.json").read_text())["tasks"] == ["mnist", "eurosat", "svhn"]
    assert (out / "surgery.safetensors").is_file() and (out / "config.json").is_file()
