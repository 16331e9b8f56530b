"""The built-in offline benchmark: shipped models, clip_finetune, the default job, the table script; and the first
design's generated tasks and build (its models are no longer shipped; tests/test_mini_clip_v2.py covers the current
design's tasks and build)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from conftest import run_cli
from hydra import compose, initialize_config_dir

from fusion_bench.data.mini_tasks import BENCHMARK_TASKS, MINI_TASKS, build_task_dataset, mini_clip_dir, mini_path
from fusion_bench.errors import ConfigError
from fusion_bench.example import register_resolvers
from fusion_bench.method.train.clip_finetune import CLIPFinetuneAlgorithm
from fusion_bench.modelpool import MODELPOOLS, CLIPVisionModelPool
from fusion_bench.scripts.cli import CONFIG_DIR
from fusion_bench.utils.instantiate import instantiate_component

register_resolvers()
TASKS = ["scenes", "vehicles", "aerial", "landcover", "house_numbers", "signs", "handwritten", "textures"]  # shipped
V1_TASKS = ["shape", "color", "texture", "background", "size", "quality", "digit", "count"]  # the first design
NUM_CLASSES = {"shape": 8, "color": 8, "texture": 8, "background": 8, "size": 3, "quality": 4, "digit": 10, "count": 6}


def compose_with(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("fusion_bench_config", overrides=overrides)


def test_v1_tasks_have_their_class_counts_and_are_deterministic():
    assert list(MINI_TASKS) == V1_TASKS
    for task in V1_TASKS:
        ds = build_task_dataset(task, n_train=NUM_CLASSES[task], n_test=NUM_CLASSES[task], seed=3)
        assert ds["train"].features["label"].names == list(MINI_TASKS[task].classnames)
        assert len(MINI_TASKS[task].classnames) == NUM_CLASSES[task]
        assert sorted(ds["test"]["label"]) == list(range(NUM_CLASSES[task]))  # balanced
        image = ds["test"][0]["image"]
        assert image.size == (32, 32) and image.mode == "RGB"
    first, again = (build_task_dataset("digit", n_train=4, n_test=4, seed=3) for _ in range(2))
    other = build_task_dataset("digit", n_train=4, n_test=4, seed=4)
    pixels = lambda ds: np.stack([np.asarray(im) for im in ds["train"]["image"]])  # noqa: E731
    assert np.array_equal(pixels(first), pixels(again)) and not np.array_equal(pixels(first), pixels(other))


def test_v1_taskpool_config_matches_task_definitions():
    cfg = compose_with(["taskpool=CLIPVisionModelTaskPool/mini-clip-v1_TA8"])
    assert list(cfg.taskpool.test_datasets) == V1_TASKS
    for task, entry in cfg.taskpool.test_datasets.items():
        assert list(entry.classnames) == list(MINI_TASKS[task].classnames), task
        assert list(entry.templates) == list(MINI_TASKS[task].templates), task


def test_resolver_errors_name_the_item():
    with pytest.raises(ConfigError, match=r"no model 'nope'"):
        mini_path("models/nope")
    with pytest.raises(
        ConfigError, match=r"expected 'models/<name>' or 'datasets/<task>'.*scenes.*first design: shape"
    ):
        mini_path("datasets/nope")


def test_shipped_assets_are_intact_and_load_through_the_pool_config():
    build = json.loads((mini_clip_dir() / "BUILD.json").read_text())
    for rel, digest in build["files"].items():
        assert hashlib.sha256((mini_clip_dir() / rel).read_bytes()).hexdigest() == digest, rel
    cfg = compose_with(["modelpool=CLIPVisionModelPool/mini-clip_TA8_model_only"])
    pool = instantiate_component(cfg.modelpool, MODELPOOLS, key="type", what="modelpool")
    assert list(BENCHMARK_TASKS) == TASKS and pool.model_names == TASKS and pool.has_pretrained
    assert build["design"] == 2 and build["tasks"] == TASKS
    base_keys = set(pool.keys("_pretrained_"))
    for name in pool.model_names:
        assert set(pool.keys(name)) == base_keys
    model = pool.load_model("handwritten")
    assert type(model).__name__ == "CLIPVisionModel" and model.config.image_size == 32
    assert pool.load_processor().image_processor.crop_size == {"height": 32, "width": 32}


def test_clip_finetune_reduces_the_loss_and_saves_a_loadable_checkpoint(tiny_example, tmp_path):
    train = {"mnist": {"path": str(tiny_example.datasets["mnist"]), "split": "train"}}
    pool = CLIPVisionModelPool({"_pretrained_": str(tiny_example.base_model)}, train_datasets=train)
    method = CLIPFinetuneAlgorithm(
        task="mnist", learning_rate=3e-3, num_steps=12, batch_size=20, seed=0, save_path=str(tmp_path / "expert")
    )
    model = method.run(pool)
    report = method.extra_report()["clip_finetune"]
    assert report["task"] == "mnist" and report["loss_last"] < report["loss_first"]
    saved = CLIPVisionModelPool({"expert": str(tmp_path / "expert")})
    reloaded = saved.load_model("expert")
    for key, tensor in saved.canonical_state_dict(reloaded).items():
        assert (tensor == pool.canonical_state_dict(model)[key]).all(), key
    assert (tmp_path / "expert" / "preprocessor_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_clip_finetune_needs_a_known_task(tiny_example):
    train = {t: {"path": str(p), "split": "train"} for t, p in tiny_example.datasets.items()}
    pool = CLIPVisionModelPool({"_pretrained_": str(tiny_example.base_model)}, train_datasets=train)
    with pytest.raises(
        ConfigError, match=r"clip_finetune: the pool's train datasets are \['mnist', 'eurosat', 'svhn'\]; choose one"
    ):
        CLIPFinetuneAlgorithm(num_steps=1).run(pool)
    with pytest.raises(ConfigError, match=r"option 'lr_scheduler' must be one of 'fixed', 'cosine'"):
        CLIPFinetuneAlgorithm(lr_scheduler="linear")


def test_default_job_runs_the_mini_benchmark(tmp_path):
    report_path = tmp_path / "report.json"
    proc = run_cli(["method=simple_average", "fast_dev_run=true", f"report_save_path={report_path}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert [k for k in report if k in BENCHMARK_TASKS] == TASKS and report["meta"]["fast_dev_run"] is True
    assert all(0.0 <= report[t]["accuracy"] <= 1.0 for t in TASKS)


def test_build_script_is_deterministic(tmp_path):
    from fusion_bench.scripts.build_mini_clip import MiniClipRecipe, build_mini_clip

    recipe = MiniClipRecipe(pretrain_steps=2, pretrain_batch_size=16, finetune_steps=2, finetune_batch_size=8)
    digests = []
    for out in (tmp_path / "a", tmp_path / "b"):
        build_mini_clip(out, recipe, tasks=["count"])
        digests.append(json.loads((out / "BUILD.json").read_text())["files"])
        assert sorted(p.name for p in out.iterdir()) == [
            ".fusion_bench_output.json",
            "BUILD.json",
            "clip-mini",
            "clip-mini_count",
        ]
    assert digests[0] == digests[1]
    assert CLIPVisionModelPool({"count": str(tmp_path / "a" / "clip-mini_count")}).load_model("count") is not None


def test_table_script_smoke_run_writes_the_tables_from_its_reports(tmp_path):
    """The README table's script end to end (two methods, a few batches per task): every row is there,
    each number is its report's, and the block says it is a smoke run."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "mini_clip_table.py"
    spec = importlib.util.spec_from_file_location("mini_clip_table_under_test", script)
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    doc, reports = tmp_path / "doc.md", tmp_path / "reports"
    doc.write_text("# before\n")
    table.main(
        [
            "--doc",
            str(doc),
            "--reports",
            str(reports),
            "--methods",
            "simple_average",
            "task_arithmetic",
            "--fast-dev-run",
        ]
    )
    text = doc.read_text()
    assert text.startswith("# before\n<!-- mini-clip-table:start -->\n**fast_dev_run:")
    assert text.rstrip().endswith("<!-- mini-clip-table:end -->")
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    for name, report_file in [
        ("`simple_average`", "method_simple_average.json"),
        ("`task_arithmetic`", "method_task_arithmetic.json"),
        ("`clip-mini`", "clip-mini.json"),
        *((f"`clip-mini_{t}`", f"clip-mini_{t}.json") for t in TASKS),
    ]:
        report = json.loads((reports / report_file).read_text())
        assert report["meta"]["fast_dev_run"] is True
        label = next(k for k in rows if k.startswith(name))
        cells = [c.strip(" *|") for c in rows[label].split(" | ")[1:]]
        assert cells == [f"{100 * report[t]['accuracy']:.1f}" for t in TASKS] + [
            f"{100 * report['average']['accuracy']:.1f}"
        ], name
    regenerated = "Regenerated with `python benchmarks/mini_clip_table.py --methods simple_average task_arithmetic"
    assert regenerated + " --fast-dev-run` in " in text  # the command that made the block, options included
    own = [json.loads((reports / f"clip-mini_{t}.json").read_text())[t]["accuracy"] for t in TASKS]
    fine_tuned = [c.strip(" *|") for c in rows["Fine-tuned (each expert on its own task)"].split(" | ")[1:]]
    assert fine_tuned == [f"{100 * a:.1f}" for a in own] + [f"{100 * sum(own) / len(own):.1f}"]
