"""Every documented command, as users type it, composes and runs: the hub ids of the composed config are swapped
for the tiny local models and datasets (the only change), and the run is a ``fast_dev_run``.

In-process (Hydra's compose + the program), so the whole file takes seconds; the process-level behaviour of the
CLI (exit codes, one-line errors) has its own tests.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fusion_bench.example import register_resolvers
from fusion_bench.program import FabricModelFusionProgram
from fusion_bench.scripts.cli import CONFIG_DIR
from fusion_bench.scripts.override_hints import list_index_override_error

register_resolvers()
ROOT = Path(__file__).resolve().parents[1]
HUB_IDS = yaml.safe_load((ROOT / "fusion_bench" / "data" / "hub_ids.yaml").read_text())

# (name, command line after `fusion_bench`); report_save_path / fast_dev_run are added by the test
DOCUMENTED = [
    (
        "evaluate one expert",
        "method=dummy modelpool=CLIPVisionModelPool/clip-vit-base-patch32_individual "
        "modelpool.models._pretrained_.pretrained_model_name_or_path=tanganke/clip-vit-base-patch32_sun397 "
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    ),
    (
        "simple average",
        "method=simple_average modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only "
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    ),
    (
        "task arithmetic",
        "method=task_arithmetic method.scaling_factor=0.3 modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 "
        "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    ),
    ("model info", "method=dummy modelpool=CLIPVisionModelPool/clip-vit-base-patch32_individual taskpool=dummy"),
    (
        "cosine similarity",
        "method=task_vector_cos_similarity method.save_to_csv={tmp}/cos.csv "
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only taskpool=dummy",
    ),
    (
        "robustness corrupted",
        "--config-name clip-vit-base-patch32_robustness_corrupted corruption=contrast method=simple_average",
    ),
    ("robustness clean", "--config-name clip-vit-base-patch32_robustness_clean method=task_arithmetic"),
    ("generalization exp1", "--config-name clip-vit-base-patch32_generalization_exp1 method=simple_average"),
    # the pool alone brings its task pool (seen / unseen means)
    (
        "generalization exp2, pool only",
        "method=task_arithmetic modelpool=CLIPVisionModelPool/clip-vit-base-patch32_generalization_exp2",
    ),
    (
        "alias individual B/32",
        "method=dummy modelpool=clip-vit-base-patch32_individual "
        "modelpool.models._pretrained_.pretrained_model_name_or_path=tanganke/clip-vit-base-patch32_svhn taskpool=clip-vit-classification_TA8",
    ),
    (
        "alias robustness clean",
        "method=simple_average modelpool=CLIPVisionModelPool/clip-vit-base-patch32_robustness_clean "
        "taskpool=clip-vit-base-patch32_robustness_clean",
    ),
    # the list form and its index override ("evaluate each expert" loops)
    (
        "list form, models.0.path",
        "method=dummy modelpool=clip-vit-base-patch32_TA8 "
        "modelpool.models.0.path=tanganke/clip-vit-base-patch32_gtsrb taskpool=clip-vit-classification_TA8",
    ),
    # a shipped pool's models replaced wholesale
    (
        "models= override",
        "method=simple_average modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only "
        "'modelpool.models={_pretrained_: {pretrained_model_name_or_path: openai/clip-vit-base-patch32}, "
        "mnist: {pretrained_model_name_or_path: tanganke/clip-vit-base-patch32_mnist}}' taskpool=clip-vit-classification_TA8",
    ),
    (
        "traditional MTL",
        "method=clip_multitask_finetune method.num_steps=1 method.batch_size=2 "
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
    ),
]


def compose_command(command: str) -> Any:
    """The config ``fusion_bench <command>`` composes (``--config-name`` honoured)."""
    args, config_name = shlex.split(command), "fusion_bench_config"
    if args[0] == "--config-name":
        config_name, args = args[1], args[2:]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=args)


class TinySubstitute:
    """Maps the hub's model and dataset ids to the tiny example's (experts and datasets in turn)."""

    def __init__(self, example) -> None:
        self.example = example
        self._experts = itertools.cycle(sorted(example.finetuned.values()))
        self._datasets = itertools.cycle(sorted(example.datasets.values()))
        self.seen: dict[str, str] = {}

    def model(self, hub_id: str) -> str:
        if hub_id not in self.seen:
            self.seen[hub_id] = str(self.example.base_model if hub_id.startswith("openai/") else next(self._experts))
        return self.seen[hub_id]

    def dataset(self, hub_id: str) -> str:
        if hub_id not in self.seen:
            self.seen[hub_id] = str(next(self._datasets))
        return self.seen[hub_id]

    def __call__(self, node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: self(v) for k, v in node.items()}
            if isinstance(node.get("path"), str) and node["path"] in HUB_IDS["datasets"]:
                out.pop("name", None)  # a hub dataset's config name (svhn's cropped_digits)
                out["path"] = self.dataset(node["path"])
            return out
        if isinstance(node, list):
            return [self(v) for v in node]
        if isinstance(node, str) and node in HUB_IDS["models"]:
            return self.model(node)
        return node


def run_documented(command: str, example, tmp_path: Path) -> dict[str, Any]:
    report_path = tmp_path / "report.json"
    cfg = compose_command(
        command.replace("{tmp}", str(tmp_path)) + f" fast_dev_run=true report_save_path={report_path}"
    )
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain = TinySubstitute(example)(plain)
    for entry in (plain.get("taskpool") or {}).get("test_datasets", {}).values():  # the tiny tasks' class names
        if isinstance(entry, dict) and Path(str(entry.get("path"))).name in example.tasks:
            entry.update(classnames=example.tasks[Path(entry["path"]).name], templates=["a photo of {}."])
    plain["fabric"] = {"_target_": "lightning.Fabric", "accelerator": "cpu", "devices": 1}
    left = [v for v in _strings(plain) if v in HUB_IDS["models"] or v in HUB_IDS["datasets"]]
    assert not left, f"hub ids left after substitution: {left}"
    FabricModelFusionProgram(OmegaConf.create(plain)).run()
    return json.loads(report_path.read_text())


def _strings(node: Any):
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


@pytest.mark.parametrize("name, command", DOCUMENTED, ids=[n for n, _ in DOCUMENTED])
def test_documented_command_runs(tiny_example, tmp_path, name, command):
    report = run_documented(command, tiny_example, tmp_path)
    assert "model_info" in report
    if "taskpool=dummy" in command:
        assert set(report["model_info"]) == {"trainable_params", "all_params", "trainable_percentage"}
        return
    assert report["meta"]["fast_dev_run"]
    tasks = [k for k, v in report.items() if isinstance(v, dict) and "accuracy" in v and k != "average"]
    assert tasks and 0.0 <= report["average"]["accuracy"] <= 1.0
    if "generalization" in name:
        text = json.dumps(report)
        assert "seen" in text and "unseen" in text
    if "cosine" in name:
        assert (tmp_path / "cos.csv").is_file()
    if "MTL" in name:
        assert report["clip_multitask_finetune"]["tasks"] == [
            "sun397",
            "stanford_cars",
            "resisc45",
            "eurosat",
            "svhn",
            "gtsrb",
            "mnist",
            "dtd",
        ]


def test_list_form_override_sets_the_indexed_model():
    cfg = compose_command("modelpool=clip-vit-base-patch32_TA8 modelpool.models.1.path=/models/x")
    assert cfg.modelpool.type == "huggingface_clip_vision"
    assert cfg.modelpool.models[1] == {"name": "sun397", "path": "/models/x"}


def test_list_index_override_on_a_dict_form_pool_names_the_key_to_use():
    def compose_fn(config_name: str, overrides: list[str]):
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name, overrides=overrides)

    args = [
        "method=dummy",
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_individual",
        "modelpool.models.0.path=/m",
    ]
    assert list_index_override_error(args, compose_fn) == (
        "'modelpool.models.0.path': this modelpool names its models (_pretrained_), it is not a list; use "
        "modelpool.models._pretrained_.pretrained_model_name_or_path=... (modelpool.models.<i>.path= works on the "
        "list form, type: huggingface_clip_vision)"
    )
    assert (
        list_index_override_error(["modelpool=clip-vit-base-patch32_TA8", "modelpool.models.0.path=/m"], compose_fn)
        is None
    )
    assert list_index_override_error(["method=dummy"], compose_fn) is None


def test_aliases_compose_to_their_target():
    pairs = [
        (
            "modelpool=clip-vit-base-patch32_individual",
            "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_individual",
        ),
        (
            "modelpool=clip-vit-large-patch14_individual",
            "modelpool=CLIPVisionModelPool/clip-vit-large-patch14_individual",
        ),
        ("taskpool=clip-vit-classification_TA8", "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8"),
        (
            "taskpool=clip-vit-classification_TA8_L14",
            "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14",
        ),
        (
            "taskpool=clip-vit-base-patch32_robustness_clean",
            "taskpool=CLIPVisionModelTaskPool/clip-vit-base-patch32_robustness_clean",
        ),
    ]
    for alias, target in pairs:
        group = alias.split("=")[0]
        assert compose_command(alias)[group] == compose_command(target)[group], alias


def test_python_pool_accepts_the_yaml_type_key():
    from fusion_bench.errors import ModelPoolError
    from fusion_bench.modelpool import HuggingFaceClipVisionPool

    pool = HuggingFaceClipVisionPool(
        type="huggingface_clip_vision", models=[{"name": "_pretrained_", "path": "a/b"}, {"name": "x", "path": "c/d"}]
    )
    assert pool.model_names == ["x"]
    with pytest.raises(ModelPoolError, match=r"type 'CLIPVisionModelPool' is not this pool's"):
        HuggingFaceClipVisionPool(type="CLIPVisionModelPool", models=[])


def test_clip_finetune_example_script(tiny_example, tmp_path):
    """examples/clip_finetune/clip_finetune.sh on the mini benchmark (one task, two steps)."""
    import subprocess
    import sys

    env = dict(os.environ, OUT=str(tmp_path / "out"), TASKS="signs", STEPS="2", BATCH="4", PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(ROOT / "examples" / "clip_finetune" / "clip_finetune.sh"), "fast_dev_run=true"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "mini-clip_full" / "signs" / "config.json").is_file()
    report = json.loads((tmp_path / "out" / "mini-clip_full" / "signs.json").read_text())
    assert report["clip_finetune"]["task"] == "signs" and report["clip_finetune"]["num_steps"] == 2
    bad = subprocess.run(
        ["bash", str(ROOT / "examples" / "clip_finetune" / "clip_finetune.sh")],
        cwd=tmp_path,
        env=dict(env, VARIANT="qlora"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == "clip_finetune.sh: error: VARIANT must be full, lora or l_lora; got 'qlora'"
    )


def test_generalization_pool_brings_its_task_pool_and_taskpool_wins() -> None:
    """``modelpool=..._generalization_expN`` alone selects the matching task pool; ``taskpool=`` still wins."""
    for pool, taskpool in [
        ("clip-vit-base-patch32_generalization_exp1", "clip-vit-classification_TA8_generalization_exp1"),
        ("mini-clip_generalization_exp2", "mini-clip_generalization_exp2"),
    ]:
        alone = compose_command(f"modelpool=CLIPVisionModelPool/{pool}")
        paired = compose_command(f"modelpool=CLIPVisionModelPool/{pool} taskpool=CLIPVisionModelTaskPool/{taskpool}")
        assert OmegaConf.to_container(alone.taskpool) == OmegaConf.to_container(paired.taskpool)
        assert set(alone.taskpool.task_groups) == {"seen", "unseen"}
        assert compose_command(f"modelpool=CLIPVisionModelPool/{pool} taskpool=dummy").taskpool._target_.endswith(
            "DummyTaskPool"
        )
