"""Generalization (seen/unseen task groups) and robustness (corrupted test splits): configs, reports, the CLI."""

from __future__ import annotations

import json
import zlib

import datasets
import numpy as np
import pytest
from conftest import run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import CLIPVisionModel

from fusion_bench.data.corruptions import CORRUPTIONS, corrupt
from fusion_bench.errors import ConfigError
from fusion_bench.example import register_resolvers
from fusion_bench.program import FabricModelFusionProgram
from fusion_bench.scripts.cli import CONFIG_DIR
from fusion_bench.taskpool import TASKPOOLS, CLIPVisionModelTaskPool
from fusion_bench.taskpool.task_groups import check_task_groups, mean_over_tasks
from fusion_bench.utils.instantiate import instantiate_component

register_resolvers()
TA8 = ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
MINI = ["scenes", "vehicles", "aerial", "landcover", "house_numbers", "signs", "handwritten", "textures"]
MIRROR = dict(zip(TA8, MINI))  # each mini task mirrors the real task at the same position
TINY = ["modelpool=CLIPVisionModelPool/tiny-clip_example", "taskpool=CLIPVisionModelTaskPool/tiny-clip_example"]


def compose_root(name: str, overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


# ---- task groups ------------------------------------------------------------------------------
def test_group_means_and_errors():
    report = {
        "a": {"accuracy": 0.5, "loss": 1.0},
        "b": {"accuracy": 0.25, "loss": 3.0},
        "c": {"accuracy": 1.0, "loss": 0.5},
    }
    assert mean_over_tasks(report, ["a", "b"]) == {"accuracy": 0.375, "loss": 2.0}
    assert check_task_groups({"seen": ["a", "b"], "unseen": ["c"]}, list(report)) == {
        "seen": ["a", "b"],
        "unseen": ["c"],
    }
    assert check_task_groups(None, list(report)) == {}
    for groups, message in [
        ({"seen": ["a", "x"]}, r"task group 'seen' names unknown task\(s\) \['x'\]; tasks: a, b, c"),
        ({"average": ["a"]}, r"task group 'average' clashes with a task or report key"),
        ({"b": ["a"]}, r"task group 'b' clashes"),
        ({"seen": []}, r"task group 'seen' must be a non-empty list of tasks, got \[\]"),
        ({"seen": "a"}, r"task group 'seen' must be a non-empty list"),
        ({"seen": ["a", "a"]}, r"task group 'seen' lists a task twice"),
        (["a"], r"'task_groups' must map group names to task lists"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_task_groups(groups, list(report))


def test_taskpool_reports_group_means_of_its_per_task_values(tiny_example, tmp_path):
    entries = {t: {"path": str(p)} for t, p in tiny_example.datasets.items()}
    groups = {"seen": ["mnist", "svhn"], "unseen": ["eurosat"]}
    pool = CLIPVisionModelTaskPool(
        entries, clip_model=str(tiny_example.base_model), head_cache_dir=None, task_groups=groups
    )
    plain = CLIPVisionModelTaskPool(entries, clip_model=str(tiny_example.base_model), head_cache_dir=None)
    model = CLIPVisionModel.from_pretrained(tiny_example.finetuned["svhn"])
    report, reference = pool.evaluate(model), plain.evaluate(model)
    assert list(report) == ["mnist", "eurosat", "svhn", "average", "seen", "unseen"]
    for task in tiny_example.datasets:
        assert report[task] == reference[task]
    for metric in ("accuracy", "loss"):
        assert report["seen"][metric] == pytest.approx((reference["mnist"][metric] + reference["svhn"][metric]) / 2)
        assert report["unseen"][metric] == reference["eurosat"][metric]
        assert report["average"][metric] == pytest.approx(sum(reference[t][metric] for t in tiny_example.datasets) / 3)
    assert pool.evaluation_meta()["task_groups"] == groups and "task_groups" not in plain.evaluation_meta()


# ---- configs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exp, seen, unseen",
    [
        ("exp1", ["sun397", "stanford_cars", "resisc45", "dtd", "svhn", "gtsrb"], ["mnist", "eurosat"]),
        ("exp2", ["sun397", "stanford_cars", "gtsrb", "eurosat", "dtd", "mnist"], ["resisc45", "svhn"]),
    ],
)
def test_generalization_configs_merge_seen_models_and_evaluate_all_eight(exp, seen, unseen):
    cfg = compose_root(
        "fusion_bench_config",
        [
            f"modelpool=CLIPVisionModelPool/clip-vit-base-patch32_generalization_{exp}",
            f"taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_generalization_{exp}",
        ],
    )
    modelpool, _, taskpool = FabricModelFusionProgram(cfg).build()
    assert modelpool.model_names == seen and modelpool.train_dataset_names == seen == modelpool.test_dataset_names
    assert [modelpool.get_model_config(t)["pretrained_model_name_or_path"] for t in seen] == [
        f"tanganke/clip-vit-base-patch32_{t.replace('_', '-')}"
        for t in seen  # the Cars expert: stanford-cars
    ]
    assert taskpool.task_names == TA8 and taskpool.task_groups == {"seen": seen, "unseen": unseen}
    mini = compose_root(
        "fusion_bench_config",
        [
            f"modelpool=CLIPVisionModelPool/mini-clip_generalization_{exp}",
            f"taskpool=CLIPVisionModelTaskPool/mini-clip_generalization_{exp}",
        ],
    )
    groups = OmegaConf.to_container(mini.taskpool.task_groups)
    assert groups == {"seen": [MIRROR[t] for t in seen], "unseen": [MIRROR[t] for t in unseen]}
    assert (
        list(mini.modelpool.models) == ["_pretrained_", *groups["seen"]] and list(mini.taskpool.test_datasets) == MINI
    )
    assert list(mini.modelpool.test_datasets) == groups["seen"]


@pytest.mark.parametrize(
    "root, table, crop", [("clip-vit-base-patch32", "imagenet", 224), ("mini-clip", "cifar", None)]
)
def test_robustness_root_configs_wire_corruption_into_every_test_split(root, table, crop):
    cfg = compose_root(f"{root}_robustness_corrupted", ["corruption=motion_blur", "severity=2", "corruption_seed=7"])
    clean = compose_root(f"{root}_robustness_clean", [])
    assert cfg.seed == 42 and cfg.report_save_path is None and cfg.method._target_ == clean.method._target_
    tasks = (
        ["stanford_cars", "eurosat", "resisc45", "gtsrb"]
        if root.startswith("clip")
        else ["vehicles", "landcover", "aerial", "signs"]  # the mini tasks mirroring the real four
    )
    for part in ("modelpool", "taskpool"):
        entries = cfg[part].test_datasets  # read key by key: the mini paths would build the mini datasets
        assert list(entries) == tasks
        for entry in entries.values():
            assert (entry.corruption, entry.severity, entry.seed, entry.table, entry.get("crop_size")) == (
                "motion_blur",
                2,
                7,
                table,
                crop,
            )
        assert all("corruption" not in e for e in clean[part].test_datasets.values())
    assert list(cfg.modelpool.models) == ["_pretrained_", *tasks] and list(clean.modelpool.models) == [
        "_pretrained_",
        *tasks,
    ]
    if root.startswith("clip"):
        _, _, taskpool = FabricModelFusionProgram(cfg).build()
        assert taskpool.evaluation_meta()["corruption"]["gtsrb"] == {
            "corruption": "motion_blur",
            "severity": 2,
            "seed": 7,
            "table": "imagenet",
            "crop_size": 224,
        }
        hub = compose_root(
            f"{root}_robustness_corrupted",
            ["corruption=spatter", "taskpool=CLIPVisionModelTaskPool/clip-vit-base-patch32_robustness_corrupted_hub"],
        )
        assert OmegaConf.to_container(hub.taskpool.test_datasets, resolve=True)["eurosat"] == {
            "path": "tanganke/eurosat",
            "split": "spatter",
        }
    with pytest.raises(
        ConfigError, match=r"missing mandatory option\(s\) 'corruption'; set them, e.g. corruption=\.\.\."
    ):
        FabricModelFusionProgram(compose_root(f"{root}_robustness_corrupted", [])).build()


def test_robustness_pools_outside_their_root_config_are_clean():
    cfg = compose_root(
        "fusion_bench_config", ["taskpool=CLIPVisionModelTaskPool/clip-vit-base-patch32_robustness_corrupted"]
    )
    taskpool = instantiate_component(cfg.taskpool, TASKPOOLS, key="type", what="taskpool")
    assert (
        taskpool.task_names == ["stanford_cars", "eurosat", "resisc45", "gtsrb"]
        and "corruption" not in taskpool.evaluation_meta()
    )


# ---- end to end -------------------------------------------------------------------------------
def corrupted_copy(path, tmp_path, corruption: str, severity: int, seed: int):
    """The test split with every image corrupted by hand, following the documented per-image seeding."""
    test = datasets.load_from_disk(str(path))["test"]
    images = [
        corrupt(
            row["image"],
            corruption,
            severity,
            table="imagenet",
            rng=np.random.default_rng([seed, i, zlib.crc32(corruption.encode())]),
        )
        for i, row in enumerate(test)
    ]
    out = tmp_path / f"{path.name}_{corruption}"
    datasets.Dataset.from_dict({"image": images, "label": test["label"]}, features=test.features).save_to_disk(str(out))
    return out


def test_cli_merges_seen_models_on_corrupted_data_and_reports_groups(tiny_example, tmp_path):
    report_path = tmp_path / "report.json"
    args = [
        "--config-name",
        "clip-vit-base-patch32_robustness_corrupted",
        "corruption=gaussian_noise",
        "severity=2",
        "corruption_seed=5",
        "method=simple_average",
        *TINY,
        "~modelpool.models.svhn",
        *(
            f"+taskpool.test_datasets.{t}.{k}=${{{v}}}"
            for t in ("mnist", "svhn")
            for k, v in (("corruption", "corruption"), ("severity", "severity"), ("seed", "corruption_seed"))
        ),
        "+taskpool.task_groups={seen:[mnist,eurosat],unseen:[svhn]}",
        f"report_save_path={report_path}",
    ]
    proc = run_cli(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    assert list(report)[-4:] == ["average", "seen", "unseen", "meta"]
    spec = {"corruption": "gaussian_noise", "severity": 2, "seed": 5, "table": "imagenet", "crop_size": None}
    assert report["meta"]["corruption"] == {"mnist": spec, "svhn": spec}
    assert report["meta"]["task_groups"] == {"seen": ["mnist", "eurosat"], "unseen": ["svhn"]}

    # oracle: the mean of the two seen experts' weights, on images corrupted by hand
    merged = CLIPVisionModel.from_pretrained(tiny_example.finetuned["mnist"])
    other = CLIPVisionModel.from_pretrained(tiny_example.finetuned["eurosat"]).state_dict()
    merged.load_state_dict({k: (v + other[k]) / 2 for k, v in merged.state_dict().items()})
    entries = {
        "mnist": str(corrupted_copy(tiny_example.datasets["mnist"], tmp_path, "gaussian_noise", 2, 5)),
        "eurosat": str(tiny_example.datasets["eurosat"]),
        "svhn": str(corrupted_copy(tiny_example.datasets["svhn"], tmp_path, "gaussian_noise", 2, 5)),
    }
    expected = CLIPVisionModelTaskPool(entries, clip_model=str(tiny_example.base_model), head_cache_dir=None).evaluate(
        merged
    )
    clean = CLIPVisionModelTaskPool(
        {"svhn": str(tiny_example.datasets["svhn"])}, clip_model=str(tiny_example.base_model), head_cache_dir=None
    ).evaluate(merged)
    for task in ("mnist", "eurosat", "svhn"):
        assert report[task] == pytest.approx(expected[task], rel=1e-5)
    assert report["svhn"]["loss"] != pytest.approx(
        clean["svhn"]["loss"], rel=1e-3
    )  # the corruption did change the data
    for metric in ("accuracy", "loss"):
        assert report["seen"][metric] == pytest.approx(
            (expected["mnist"][metric] + expected["eurosat"][metric]) / 2, rel=1e-5
        )
        assert report["unseen"][metric] == pytest.approx(expected["svhn"][metric], rel=1e-5)


def test_cli_without_a_corruption_is_a_one_line_error(tiny_example, tmp_path):
    proc = run_cli(
        [
            "--config-name",
            "clip-vit-base-patch32_robustness_corrupted",
            "method=dummy",
            "modelpool=CLIPVisionModelPool/tiny-clip_example",
            f"report_save_path={tmp_path / 'r.json'}",
        ],
        cwd=tmp_path,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0] == "fusion_bench: error: missing mandatory option(s) 'corruption'; set them, e.g. corruption=..."
    assert not (tmp_path / "r.json").exists()
    with pytest.raises(
        ConfigError,
        match=r"^test dataset 'stanford_cars': unknown corruption 'fog'; choose one of " + ", ".join(CORRUPTIONS),
    ):
        FabricModelFusionProgram(compose_root("clip-vit-base-patch32_robustness_corrupted", ["corruption=fog"])).build()


def test_corruption_figure_shows_each_corruption_and_severity(tmp_path):
    from PIL import Image

    from fusion_bench.scripts.corruption_figure import corruption_grid, save_corruption_grid
    from fusion_bench.testing.tiny_datasets import _class_image

    img = _class_image(np.random.default_rng(0), 3, 8, 32, "RGB")
    fig = corruption_grid(img, index=4, table="cifar")
    axes = np.array(fig.axes).reshape(len(CORRUPTIONS), 6)
    assert [ax.get_ylabel() for ax in axes[:, 0]] == list(CORRUPTIONS)
    assert [ax.get_title() for ax in axes[0]] == ["clean", *(f"severity {s}" for s in range(1, 6))]
    shown = axes[1, 5].get_images()[0].get_array()  # gaussian_noise, severity 5, image index 4
    expected = corrupt(
        img, "gaussian_noise", 5, table="cifar", rng=np.random.default_rng([0, 4, zlib.crc32(b"gaussian_noise")])
    )
    assert np.array_equal(np.asarray(shown), np.asarray(expected))
    path = save_corruption_grid(img, tmp_path / "fig" / "grid.png", table="cifar", severities=(5,))
    assert Image.open(path).size == (320, 1120) and [p.name for p in path.parent.iterdir()] == ["grid.png"]
