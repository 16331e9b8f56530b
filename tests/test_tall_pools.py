"""The 14- and 20-task (TALL-masks) pools and task pools: they compose, instantiate offline, ask the hub for
the right ids (checked up to the download), and every task has built-in class names and templates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from fusion_bench.data.clip_tasks import TALL14_TASK_NAMES, TALL20_TASK_NAMES, load_classnames_and_templates
from fusion_bench.errors import ModelLoadError
from fusion_bench.example import register_resolvers
from fusion_bench.modelpool import MODELPOOLS, CLIPVisionModelPool
from fusion_bench.scripts.cli import CONFIG_DIR
from fusion_bench.taskpool import TASKPOOLS, CLIPVisionModelTaskPool
from fusion_bench.utils.instantiate import instantiate_component

register_resolvers()
HUB_IDS = yaml.safe_load((Path(CONFIG_DIR).parent / "data" / "hub_ids.yaml").read_text())
ARCHS = {"base-patch32": "", "base-patch16": "_B16", "large-patch14": "_L14"}
TASKS = {"14": TALL14_TASK_NAMES, "20": TALL20_TASK_NAMES}
# written out here (not derived from the configs): the experts' repo suffixes use hyphens for Cars, Pets, SST2
EXPERT_SUFFIX = {
    "stanford_cars": "stanford-cars",
    "oxford_iiit_pet": "oxford-iiit-pet",
    "rendered_sst2": "rendered-sst2",
}


def _compose(group: str, name: str):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("fusion_bench_config", overrides=[f"{group}={name}"])[group]


def test_task_lists():
    assert TALL14_TASK_NAMES[8:] == ("oxford_flowers102", "pcam", "fer2013", "oxford_iiit_pet", "stl10", "cifar100")
    assert TALL20_TASK_NAMES[:14] == TALL14_TASK_NAMES
    assert TALL20_TASK_NAMES[14:] == (
        "cifar10",
        "food101",
        "fashion_mnist",
        "emnist_letters",
        "kmnist",
        "rendered_sst2",
    )


@pytest.mark.parametrize("n", ["14", "20"])
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("variant", ["", "_model_only"])
def test_modelpool_composes_and_asks_the_hub_for_the_right_ids(monkeypatch, n, arch, variant):
    cfg = _compose("modelpool", f"CLIPVisionModelPool/clip-vit-{arch}_TALL{n}{variant}")
    pool = instantiate_component(cfg, MODELPOOLS, key="type", what="modelpool")
    assert isinstance(pool, CLIPVisionModelPool) and pool.has_pretrained
    assert pool.model_names == list(TASKS[n])
    expected = {name: f"tanganke/clip-vit-{arch}_{EXPERT_SUFFIX.get(name, name)}" for name in TASKS[n]}
    expected["_pretrained_"] = f"openai/clip-vit-{arch}"
    asked: list[str] = []

    def fake_hub_file(repo_id, filename, revision, *, what):
        asked.append(repo_id)
        raise ModelLoadError(f"{what}: offline test")

    monkeypatch.setattr("fusion_bench.modelpool.clip_vision._hub_file", fake_hub_file)
    for name, repo in expected.items():
        assert repo in HUB_IDS["models"], repo
        with pytest.raises(ModelLoadError, match="offline test"):
            pool.load_model(name)
        assert asked[-1] == repo
    if variant == "":
        for split in ("train", "test"):
            datasets = cfg[f"{split}_datasets"]
            assert list(datasets) == list(TASKS[n])
            for entry in datasets.values():
                path = entry.get("path")
                assert path is None or path in HUB_IDS["datasets"], path
    else:
        assert "train_datasets" not in cfg and "test_datasets" not in cfg


@pytest.mark.parametrize("n", ["14", "20"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_taskpool_composes_with_every_task_known(n, arch):
    cfg = _compose("taskpool", f"CLIPVisionModelTaskPool/clip-vit-classification_TALL{n}{ARCHS[arch]}")
    taskpool = instantiate_component(cfg, TASKPOOLS, key="type", what="taskpool")
    assert isinstance(taskpool, CLIPVisionModelTaskPool)
    assert taskpool.task_names == list(TASKS[n])
    assert cfg.clip_model.pretrained_model_name_or_path == f"openai/clip-vit-{arch}"
    assert cfg.test_datasets.food101.split == "validation" if n == "20" else "food101" not in cfg.test_datasets
    for task in TASKS[n]:
        classnames, templates = load_classnames_and_templates(task)
        assert classnames and templates


def test_fer2013_loader_renames_the_webdataset_columns(tmp_path):
    import datasets
    from PIL import Image

    from fusion_bench.data.hub_loaders import load_fer2013

    image = Image.new("RGB", (4, 4))
    ds = datasets.Dataset.from_dict(
        {"__key__": ["a", "b"], "__url__": ["u", "u"], "jpg": [image, image], "cls": [3, 5]}
    )
    ds.save_to_disk(str(tmp_path / "fer"))
    loaded = load_fer2013("test", path=str(tmp_path / "fer"))
    assert loaded.column_names == ["image", "label"] and loaded["label"] == [3, 5]
