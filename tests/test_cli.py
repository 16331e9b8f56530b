"""The `fusion_bench` command end to end, offline, on the built-in tiny example."""

from __future__ import annotations

import json
import re

import pytest
from conftest import run_cli
from transformers import CLIPVisionModel

from fusion_bench.scripts.cli import config_choices

TINY = ["modelpool=CLIPVisionModelPool/tiny-clip_example", "taskpool=CLIPVisionModelTaskPool/tiny-clip_example"]


def test_end_to_end_report_matches_in_process_evaluation(tiny_example, tmp_path):
    report_path = tmp_path / "reports" / "dummy.json"
    proc = run_cli(
        ["method=dummy", *TINY, f"report_save_path={report_path}", "print_config=true", "--json"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert list(report)[:1] == ["model_info"] and report["model_info"]["all_params"] > 0
    assert set(tiny_example.datasets) <= set(report) and "average" in report
    assert report["meta"]["fast_dev_run"] is False and report["meta"]["seed"] == 42
    assert "_target_: fusion_bench.method.DummyAlgorithm" in proc.stderr  # print_config
    assert json.loads(proc.stdout) == report  # --json: stdout is exactly the saved report
    assert re.search(r"^average +\d+\.\d\d%", proc.stderr, re.M)  # the summary went to stderr

    from fusion_bench.taskpool import CLIPVisionModelTaskPool

    pool = CLIPVisionModelTaskPool(
        test_datasets={t: str(p) for t, p in tiny_example.datasets.items()},
        clip_model=str(tiny_example.base_model),
        head_cache_dir=None,
    )
    expected = pool.evaluate(CLIPVisionModel.from_pretrained(tiny_example.base_model))
    for task in tiny_example.datasets:
        assert report[task] == pytest.approx(expected[task])


def test_individual_model_override_and_dummy_taskpool(tiny_example, tmp_path):
    proc = run_cli(
        [
            "method=dummy",
            "modelpool=CLIPVisionModelPool/tiny-clip_example_individual",
            "taskpool=dummy",
            f"modelpool.models._pretrained_.pretrained_model_name_or_path={tiny_example.finetuned['mnist']}",
            "report_save_path=false",
            "--json",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert set(report["model_info"]) == {"trainable_params", "all_params", "trainable_percentage"}
    assert not list(tmp_path.glob("*.json"))


def test_multirun_sweep_writes_one_report_per_job(tiny_example, tmp_path):
    proc = run_cli(
        [
            "-m",
            "method=dummy",
            "modelpool=CLIPVisionModelPool/tiny-clip_example_model_only",
            "taskpool=dummy",
            "seed=1,2",
            "report_save_path=" + str(tmp_path / "sweep") + "/seed_${seed}.json",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    for seed in (1, 2):
        assert json.loads((tmp_path / "sweep" / f"seed_{seed}.json").read_text())["meta"]["seed"] == seed
    assert (tmp_path / "outputs" / "multirun").is_dir()  # Hydra's sweep dir under the cwd


@pytest.mark.parametrize(
    "args, message",
    [
        (["method=nope"], r"fusion_bench: error: unknown method 'nope'\. Known: .*\bdummy, .*\btask_arithmetic\b"),
        (
            ["taskpool=CLIPVisionModelTaskPool/nope"],
            r"fusion_bench: error: unknown taskpool 'CLIPVisionModelTaskPool/nope'\. Known: .*\bCLIPVisionModelTaskPool/clip-vit-classification_TA8\b",
        ),
        (
            [
                "modelpool=CLIPVisionModelPool/tiny-clip_example",
                "modelpool.models.mnist.pretrained_model_name_or_path=/nowhere/x",
            ],
            r"fusion_bench: error: model 'mnist': path '/nowhere/x' does not exist",
        ),
    ],
)
def test_bad_input_is_one_line_error_without_report(tiny_example, tmp_path, args, message):
    report = tmp_path / "r.json"
    proc = run_cli([*args, f"report_save_path={report}"], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(message, lines[0]), proc.stderr
    assert not report.exists()


def test_non_clip_model_through_cli(tiny_example, tmp_path):
    from transformers import ViTConfig, ViTModel

    vit = tmp_path / "vit"
    ViTModel(
        ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=8, patch_size=4
        )
    ).save_pretrained(vit)
    report = tmp_path / "r.json"
    proc = run_cli(
        [
            "modelpool=CLIPVisionModelPool/tiny-clip_example_individual",
            f"modelpool.models._pretrained_.pretrained_model_name_or_path={vit}",
            "taskpool=dummy",
            f"report_save_path={report}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"fusion_bench: error: model '_pretrained_' ({vit}) is a 'vit' model, not a CLIP vision model "
        "(expected model_type 'clip' or 'clip_vision_model')"
    )
    assert not report.exists()


def test_help_lists_groups(tmp_path):
    proc = run_cli(["--help"], cwd=tmp_path)
    assert proc.returncode == 0
    for group in ("method", "modelpool", "taskpool", "fabric"):
        assert f"{group}:" in proc.stdout


def test_config_choices():
    assert "dummy" in config_choices("method")
    assert "CLIPVisionModelPool/clip-vit-base-patch32_TA8" in config_choices("modelpool")
    assert "clip-vit-base-patch32_TA8" in config_choices("modelpool")  # the older list-form config
