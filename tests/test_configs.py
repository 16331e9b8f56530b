"""Every shipped YAML composes, and instantiates (all are lazy: nothing is downloaded at build time)."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fusion_bench.example import register_resolvers
from fusion_bench.method import ALGORITHMS, BaseAlgorithm
from fusion_bench.modelpool import MODELPOOLS, BaseModelPool, CLIPVisionModelPool
from fusion_bench.program import FabricModelFusionProgram
from fusion_bench.scripts.cli import CONFIG_DIR, config_choices
from fusion_bench.taskpool import TASKPOOLS, BaseTaskPool, CLIPVisionModelTaskPool
from fusion_bench.utils.instantiate import instantiate_component

register_resolvers()
CLIP_TASKS = ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
MINI_TASKS = ["scenes", "vehicles", "aerial", "landcover", "house_numbers", "signs", "handwritten", "textures"]
MINI_V1_TASKS = ["shape", "color", "texture", "background", "size", "quality", "digit", "count"]
KINDS = {
    "method": (ALGORITHMS, "name", BaseAlgorithm),
    "modelpool": (MODELPOOLS, "type", BaseModelPool),
    "taskpool": (TASKPOOLS, "type", BaseTaskPool),
}


def compose_with(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("fusion_bench_config", overrides=overrides)


# configs whose resolver builds an example: the session fixture builds it once, before the config is resolved
EXAMPLE_FIXTURES = {
    "tiny-vit_example": "tiny_classification_example",
    "tiny-resnet_example": "tiny_classification_example",
}


@pytest.mark.parametrize("group, name", [(g, n) for g in KINDS for n in config_choices(g)])
def test_every_config_instantiates(tiny_example, request, group, name):
    if group == "modelpool" and "mini-clip-v1" in name:
        pytest.skip(
            "the first mini design's models are built, not shipped: tests/test_mini_clip_benchmark.py builds them"
        )
    fixture = EXAMPLE_FIXTURES.get(name.rsplit("/", 1)[-1])
    if fixture is not None:
        request.getfixturevalue(fixture)
    cfg = compose_with([f"{group}={name}"])
    registry, key, base = KINDS[group]
    component = instantiate_component(cfg[group], registry, key=key, what=group)
    assert isinstance(component, base)
    tasks = MINI_V1_TASKS if "mini-clip-v1" in name else MINI_TASKS if "mini-clip" in name else CLIP_TASKS
    if isinstance(component, CLIPVisionModelPool) and "TA8" in name:
        assert len(component.model_names) == 8 and component.has_pretrained
        assert component.model_names == tasks
    if isinstance(component, CLIPVisionModelTaskPool) and "TA8" in name:
        assert component.task_names == tasks


@pytest.mark.parametrize("name", config_choices("fabric"))
def test_fabric_configs(name, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_with([f"fabric={name}", f"fabric.loggers.root_dir={tmp_path}"])
    assert type(instantiate(cfg.fabric)).__name__ == "Fabric"


def test_root_config_defaults_and_program_build():
    cfg = compose_with([])
    assert cfg.seed == 42 and cfg.report_save_path is None and OmegaConf.select(cfg, "method._target_")
    modelpool, method, taskpool = FabricModelFusionProgram(cfg).build()  # the offline benchmark by default
    assert modelpool.model_names == MINI_TASKS and taskpool.task_names == MINI_TASKS


def test_legacy_names_and_unknown_options():
    from fusion_bench.errors import ConfigError, UnknownNameError
    from fusion_bench.method import DummyAlgorithm

    assert isinstance(instantiate_component({"name": "dummy"}, ALGORITHMS, key="name", what="method"), DummyAlgorithm)
    with pytest.raises(
        UnknownNameError, match=r"unknown method 'dumy'. Did you mean 'dummy'\? Known: .*\bdummy, .*\btask_arithmetic\b"
    ):
        instantiate_component({"name": "dumy"}, ALGORITHMS, key="name", what="method")
    with pytest.raises(ConfigError, match=r"method 'DummyAlgorithm': unknown option\(s\) 'scaling_factor'"):
        instantiate_component(
            {"_target_": "fusion_bench.method.DummyAlgorithm", "scaling_factor": 0.3},
            ALGORITHMS,
            key="name",
            what="method",
        )
    with pytest.raises(ConfigError, match=r"modelpool: cannot import _target_ 'fusion_bench.nope.Pool'"):
        instantiate_component({"_target_": "fusion_bench.nope.Pool"}, MODELPOOLS, key="type", what="modelpool")
