"""CLIPVisionModelPool: lazy loading, both key layouts, per-tensor access, datasets, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import CLIPVisionModel, ViTConfig, ViTModel

from fusion_bench.errors import DatasetError, ModelLoadError, ModelPoolError, UnknownNameError
from fusion_bench.modelpool import BaseModelPool, CLIPVisionModelPool, HuggingFaceClipVisionPool
from fusion_bench.models.hf_clip import vision_state_dict


@pytest.fixture()
def pool(tiny_example) -> CLIPVisionModelPool:
    models = {"_pretrained_": {"pretrained_model_name_or_path": str(tiny_example.base_model)}}
    models.update({t: str(p) for t, p in tiny_example.finetuned.items()})
    datasets = {t: {"path": str(p)} for t, p in tiny_example.datasets.items()}
    return CLIPVisionModelPool(models, train_datasets=datasets, test_datasets=datasets)


def test_names_and_pretrained(pool, tiny_example):
    assert pool.model_names == list(tiny_example.finetuned)
    assert pool.all_model_names[0] == "_pretrained_" and pool.has_pretrained
    assert len(pool) == len(tiny_example.finetuned)
    assert isinstance(pool.load_pretrained_model(), CLIPVisionModel)


@pytest.mark.parametrize("task_index", [0, 1])
def test_load_model_matches_from_pretrained(pool, tiny_example, task_index):
    # variants alternate key layouts ("vision_model."-prefixed and bare): both must load the same way
    name = pool.model_names[task_index]
    ours = vision_state_dict(pool.load_model(name))
    reference = vision_state_dict(CLIPVisionModel.from_pretrained(tiny_example.finetuned[name]))
    assert ours.keys() == reference.keys()
    for key in ours:
        assert torch.equal(ours[key], reference[key]), key


def test_pretrained_from_full_clip_checkpoint_drops_text_tower(pool):
    keys = pool.keys("_pretrained_")
    assert keys and not any(k.startswith(("text_model", "vision_model.", "logit_scale")) for k in keys)
    assert set(keys) == set(pool.keys(pool.model_names[0]))


def test_get_tensor_equals_loaded_weights(pool):
    name = pool.model_names[0]
    state = vision_state_dict(pool.load_model(name))
    for key in pool.keys(name):
        assert torch.equal(pool.get_tensor(name, key), state[key]), key
    shape, dtype = pool.tensor_source(name).shape_dtype(pool.keys(name)[0])
    assert shape == tuple(state[pool.keys(name)[0]].shape) and dtype == torch.float32


def test_load_model_returns_fresh_copies(pool):
    a, b = pool.load_model("_pretrained_"), pool.load_model("_pretrained_")
    assert a is not b
    next(a.parameters()).data.add_(1.0)
    assert not torch.equal(next(a.parameters()), next(b.parameters()))


def test_datasets_and_processor(pool, tiny_example):
    task = pool.model_names[0]
    assert pool.test_dataset_names == list(tiny_example.datasets)
    test, train = pool.load_test_dataset(task), pool.load_train_dataset(task)
    assert {"image", "label"} <= set(test.column_names) and len(train) > 0
    processor = pool.load_processor()
    assert processor.image_processor is not None and processor.tokenizer is not None
    with pytest.raises(UnknownNameError, match="no val dataset for 'mnist'"):
        pool.load_val_dataset("mnist")


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=r"model 'sun397': path '.*nowhere' does not exist"):
        CLIPVisionModelPool({"sun397": str(tmp_path / "nowhere")})


def test_not_a_clip_model_is_named(tmp_path):
    vit_dir = tmp_path / "vit"
    ViTModel(
        ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=8, patch_size=4
        )
    ).save_pretrained(vit_dir)
    pool = CLIPVisionModelPool({"vit": str(vit_dir)})
    with pytest.raises(ModelLoadError, match=r"model 'vit' .* is a 'vit' model, not a CLIP vision model"):
        pool.load_model("vit")


def test_hub_id_offline_is_a_clear_error():
    pool = CLIPVisionModelPool({"sun397": "tanganke/clip-vit-base-patch32_sun397"})
    with pytest.raises(
        ModelLoadError, match=r"model 'sun397' .*cannot get 'config.json' of 'tanganke/clip-vit-base-patch32_sun397'"
    ):
        pool.load_model("sun397")


def test_architecture_mismatch_names_the_tensor(tiny_example, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_example.finetuned["mnist"], broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ModelLoadError,
        match=r"tensor 'encoder.layers.0.mlp.fc1.bias' has shape \(64,\), the architecture expects \(128,\)",
    ):
        CLIPVisionModelPool({"m": str(broken)}).load_model("m")


def test_bad_entry_and_unknown_model(tiny_example):
    with pytest.raises(ModelPoolError, match=r"model 'a': entry needs 'pretrained_model_name_or_path'.*'torch_dtype'"):
        CLIPVisionModelPool({"a": {"pretrained_model_name_or_path": "x/y", "dtype": "float16"}})
    pool = CLIPVisionModelPool({"a": str(tiny_example.base_model)})
    with pytest.raises(UnknownNameError, match=r"model 'b' is not in the pool; models: a"):
        pool.load_model("b")
    with pytest.raises(ModelPoolError, match="non-empty mapping"):
        CLIPVisionModelPool({})


def test_dataset_missing_path_named(tiny_example, tmp_path):
    pool = CLIPVisionModelPool({"a": str(tiny_example.base_model)}, test_datasets={"a": str(tmp_path / "none")})
    with pytest.raises(DatasetError, match=r"test dataset 'a': local path .* does not exist"):
        pool.load_test_dataset("a")


def test_torch_dtype_option(tiny_example):
    pool = CLIPVisionModelPool(
        {"a": {"pretrained_model_name_or_path": str(tiny_example.base_model), "torch_dtype": "bfloat16"}}
    )
    assert next(pool.load_model("a").parameters()).dtype == torch.bfloat16


def test_legacy_list_form(tiny_example):
    pool = HuggingFaceClipVisionPool(
        models=[{"name": "_pretrained_", "path": str(tiny_example.base_model)}]
        + [{"name": t, "path": str(p)} for t, p in tiny_example.finetuned.items()],
        tta_datasets=[
            {"name": t, "dataset": {"type": "instantiate", "name": str(p), "split": "test"}}
            for t, p in tiny_example.datasets.items()
        ],
    )
    assert pool.model_names == list(tiny_example.finetuned)
    assert len(pool.load_test_dataset("mnist")) > 0
    with pytest.raises(ModelPoolError, match=r"models\[0\]: each entry needs a 'name'"):
        HuggingFaceClipVisionPool(models=[{"path": "x"}])


def test_in_memory_modules_and_base_pool_tensor_access(tiny_example):
    model = CLIPVisionModel.from_pretrained(tiny_example.base_model)
    pool = BaseModelPool({"_pretrained_": model, "m": model})
    assert pool.model_names == ["m"]
    key = next(iter(model.state_dict()))
    assert torch.equal(pool.get_tensor("m", key), model.state_dict()[key])


def test_target_entry_must_build_a_clip_vision_model():
    pool = CLIPVisionModelPool({"lin": {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 3}})
    with pytest.raises(ModelLoadError, match=r"^model 'lin': _target_ returned a Linear, not a CLIP vision model$"):
        pool.load_model("lin")
