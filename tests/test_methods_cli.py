"""Every data-free method through the program (as the CLI composes it), and a merge saved by the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli
from hydra import compose, initialize_config_dir

from fusion_bench.example import register_resolvers
from fusion_bench.method.task_vector.ties_merging import TiesMergingAlgorithm
from fusion_bench.modelpool import CLIPVisionModelPool
from fusion_bench.models.hf_clip import vision_state_dict
from fusion_bench.program import FabricModelFusionProgram
from fusion_bench.scripts.cli import CONFIG_DIR

DATA_FREE = [
    "simple_average",
    "weighted_average",
    "task_arithmetic",
    "ties_merging",
    "dare/task_arithmetic",
    "dare/ties_merging",
    "model_breadcrumbs",
    "consensus/ta_consensus",
    "consensus/ties_consensus",
    "tsv_merging",
    "iso_c",
    "iso_cts",
    "wudi_merging",
    "lines",
    "pcb_merging",
    "model_stock",
    "task_vector_cos_similarity",
]
POOL = "modelpool=CLIPVisionModelPool/tiny-clip_example_model_only"


def run_program(overrides: list[str]) -> tuple[dict, torch.nn.Module]:
    """Compose the root config as the CLI does and run it in process; return report and model."""
    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fusion_bench_config", overrides=overrides)
    program = FabricModelFusionProgram(cfg)
    report = program.run()
    return report, program.model


@pytest.mark.parametrize("method", DATA_FREE)
def test_every_data_free_method_runs_through_the_program(tiny_example, tmp_path, method, capsys):
    extra = {
        "task_vector_cos_similarity": [f"method.save_to_csv={tmp_path / 'cos.csv'}"],
        "wudi_merging": ["method.steps=10"],
    }.get(method, [])
    report, model = run_program([f"method={method}", POOL, "taskpool=dummy", *extra])
    base = vision_state_dict(CLIPVisionModelPool({"b": str(tiny_example.base_model)}).load_model("b"))
    merged = vision_state_dict(model)
    assert merged.keys() == base.keys()
    assert all(merged[k].shape == base[k].shape and merged[k].dtype == base[k].dtype for k in base)
    assert report["model_info"]["all_params"] == sum(v.numel() for v in base.values())
    _, again = run_program([f"method={method}", POOL, "taskpool=dummy", *extra])
    assert all(torch.equal(t, vision_state_dict(again)[k]) for k, t in merged.items()), "not deterministic"


def test_cli_saves_the_merged_model_atomically_with_processor_and_card(tiny_example, tmp_path):
    out = tmp_path / "merged"
    proc = run_cli(
        [
            "method=ties_merging",
            "method.scaling_factor=0.3",
            "method.threshold=20",
            POOL,
            "taskpool=dummy",
            f"merged_model_save_path={out}",
            f"report_save_path={tmp_path / 'r.json'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert "TiesMergingAlgorithm(scaling_factor=0.3" in (out / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    saved = vision_state_dict(CLIPVisionModelPool({"m": str(out)}).load_model("m"))
    pool = CLIPVisionModelPool(
        {"_pretrained_": str(tiny_example.base_model), **{t: str(p) for t, p in tiny_example.finetuned.items()}}
    )
    expected = vision_state_dict(TiesMergingAlgorithm(scaling_factor=0.3, threshold=20).run(pool))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    assert json.loads((tmp_path / "r.json").read_text())["model_info"]["all_params"] > 0


def test_bad_method_option_is_one_line_error_and_nothing_is_written(tiny_example, tmp_path):
    out = tmp_path / "merged"
    proc = run_cli(
        [
            "method=ties_merging",
            "method.threshold=0",
            POOL,
            "taskpool=dummy",
            f"merged_model_save_path={out}",
            f"report_save_path={tmp_path / 'r.json'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fusion_bench: error: ties_merging: option 'threshold' must be in (0, 100] (percent of each task vector's "
        "entries kept by magnitude); got 0"
    ]
    assert not out.exists() and not (tmp_path / "r.json").exists()
