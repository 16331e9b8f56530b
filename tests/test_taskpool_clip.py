"""CLIPVisionModelTaskPool: zero-shot accuracy/loss against an independent computation, hooks, cache, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPProcessor, CLIPVisionModel

import fusion_bench.models.zero_shot as zero_shot
from fusion_bench.data.clip_tasks import load_classnames_and_templates
from fusion_bench.errors import ConfigError, DatasetError, ModelLoadError
from fusion_bench.taskpool import CLIPVisionModelTaskPool, DummyTaskPool


def make_taskpool(tiny_example, tmp_path, **kwargs) -> CLIPVisionModelTaskPool:
    options = dict(
        test_datasets={t: {"path": str(p)} for t, p in tiny_example.datasets.items()},
        clip_model=str(tiny_example.base_model),
        dataloader_kwargs={"batch_size": 7},  # not a divisor of the sizes: the last batch is short
        head_cache_dir=str(tmp_path / "heads"),
    )
    options.update(kwargs)
    return CLIPVisionModelTaskPool(**options)


def independent_metrics(clip_dir, vision_dir, dataset, classnames, templates) -> tuple[float, float]:
    """Accuracy and mean per-sample CE via CLIPModel's own forward (text_embeds/image_embeds)."""
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    if vision_dir is not None:
        finetuned = CLIPVisionModel.from_pretrained(vision_dir)
        inner = clip.vision_model
        source = getattr(finetuned, "vision_model", finetuned) if type(inner) is not type(finetuned) else finetuned
        inner.load_state_dict(source.state_dict())
    processor = CLIPProcessor.from_pretrained(clip_dir)
    pixels = processor(images=[img.convert("RGB") for img in dataset["image"]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        heads = []
        for name in classnames:
            text = processor.tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
            out = clip(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels[:1])
            mean = out.text_embeds.double().mean(0)
            heads.append((mean / mean.norm()).numpy())
        image = clip(
            input_ids=text["input_ids"][:1], attention_mask=text["attention_mask"][:1], pixel_values=pixels
        ).image_embeds
        scale = clip.logit_scale.exp().item()
    logits = scale * image.double().numpy() @ np.stack(heads).T
    labels = np.asarray(dataset["label"])
    log_z = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ce = log_z - logits[np.arange(len(labels)), labels]
    return float((logits.argmax(1) == labels).mean()), float(ce.mean())


@pytest.mark.parametrize("which", ["pretrained", "finetuned"])
def test_accuracy_and_loss_match_independent_computation(tiny_example, tmp_path, which):
    pool = make_taskpool(tiny_example, tmp_path)
    vision_dir = None if which == "pretrained" else tiny_example.finetuned["eurosat"]
    model = CLIPVisionModel.from_pretrained(vision_dir or tiny_example.base_model)
    report = pool.evaluate(model)
    assert set(report) == {*tiny_example.datasets, "average"}
    for task in tiny_example.datasets:
        classnames, templates = load_classnames_and_templates(task)
        acc, loss = independent_metrics(
            tiny_example.base_model, vision_dir, pool.test_datasets[task], classnames, templates
        )
        assert report[task]["accuracy"] == pytest.approx(acc, abs=1e-9)
        assert report[task]["loss"] == pytest.approx(loss, rel=1e-4)
    for metric in ("accuracy", "loss"):
        assert report["average"][metric] == pytest.approx(np.mean([report[t][metric] for t in tiny_example.datasets]))
    meta = pool.evaluation_meta()
    assert meta["fast_dev_run"] is False and meta["num_samples"]["mnist"] == len(pool.test_datasets["mnist"])
    assert set(meta["images_per_second"]) == set(tiny_example.datasets)  # the speed of every task
    assert all(isinstance(v, float) and v > 0 for v in meta["images_per_second"].values())


def test_fast_dev_run_limits_batches_and_is_marked(tiny_example, tmp_path):
    pool = make_taskpool(tiny_example, tmp_path, fast_dev_run=True)
    pool.evaluate(CLIPVisionModel.from_pretrained(tiny_example.base_model))
    assert pool.evaluation_meta()["fast_dev_run"] is True
    assert all(n == 7 for n in pool.evaluation_meta()["num_samples"].values())


@pytest.mark.parametrize("first_token_only", [True, False])
def test_layer_wise_features_saved(tiny_example, tmp_path, first_token_only):
    pool = make_taskpool(
        tiny_example,
        tmp_path,
        layer_wise_feature_save_path=str(tmp_path / "feats"),
        layer_wise_feature_first_token_only=first_token_only,
        layer_wise_feature_max_num=10,
    )
    model = CLIPVisionModel.from_pretrained(tiny_example.base_model)
    pool.evaluate(model)
    feats = load_file(str(tmp_path / "feats" / "mnist.safetensors"))
    cfg = model.config
    assert sorted(feats) == [f"layer_{i}" for i in range(cfg.num_hidden_layers)]
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1
    expected = (10, cfg.hidden_size) if first_token_only else (10, tokens, cfg.hidden_size)
    assert tuple(feats["layer_0"].shape) == expected
    # hooks are removed after evaluation
    assert all(not layer._forward_hooks for layer in model.encoder.layers)


def test_heads_cached_by_content(tiny_example, tmp_path, monkeypatch):
    calls = []
    original = zero_shot.build_zero_shot_classifier
    monkeypatch.setattr(zero_shot, "build_zero_shot_classifier", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = CLIPVisionModel.from_pretrained(tiny_example.base_model)
    first = make_taskpool(tiny_example, tmp_path).evaluate(model)
    # mnist and svhn share class names and templates, hence one head: 2 builds for 3 tasks
    assert len(calls) == 2 and len(list((tmp_path / "heads").iterdir())) == 2
    second = make_taskpool(tiny_example, tmp_path).evaluate(model)
    assert len(calls) == 2 and first == second  # all from the cache, same numbers
    custom = {
        "path": str(tiny_example.datasets["mnist"]),
        "classnames": [str(i) for i in range(10)],
        "templates": ["digit {}"],
    }
    make_taskpool(tiny_example, tmp_path, test_datasets={"mnist": custom}).evaluate(model)
    assert len(calls) == 3  # other templates: other key


def test_classname_count_mismatch(tiny_example, tmp_path):
    entry = {"path": str(tiny_example.datasets["mnist"]), "classnames": ["a", "b"], "templates": ["{}"]}
    pool = make_taskpool(tiny_example, tmp_path, test_datasets={"mnist": entry})
    with pytest.raises(DatasetError, match=r"test dataset 'mnist': the dataset has 10 classes but 2 class names"):
        pool.setup()


def test_missing_columns(tiny_example, tmp_path):
    import datasets

    ds = datasets.load_from_disk(str(tiny_example.datasets["mnist"]))["test"].rename_column("image", "img")
    ds.save_to_disk(str(tmp_path / "renamed"))
    pool = make_taskpool(tiny_example, tmp_path, test_datasets={"mnist": str(tmp_path / "renamed")})
    with pytest.raises(
        DatasetError, match=r"test dataset 'mnist': missing column\(s\) \['image'\]; it has \['img', 'label'\]"
    ):
        pool.setup()


def test_unknown_task_needs_classnames(tiny_example, tmp_path):
    with pytest.raises(ConfigError, match=r"test dataset 'flowers': no built-in class names"):
        make_taskpool(tiny_example, tmp_path, test_datasets={"flowers": "x"})
    with pytest.raises(ConfigError, match=r"exactly one '\{\}'"):
        make_taskpool(
            tiny_example, tmp_path, test_datasets={"t": {"path": "x", "classnames": ["a"], "templates": ["no slot"]}}
        )


def test_non_clip_model_rejected(tiny_example, tmp_path):
    pool = make_taskpool(tiny_example, tmp_path)
    with pytest.raises(ModelLoadError, match="the model to evaluate is a Linear, not a CLIP vision model"):
        pool.evaluate(torch.nn.Linear(2, 2))


def test_dummy_taskpool_model_info():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model[1].requires_grad_(False)
    assert DummyTaskPool().evaluate(model) == {
        "model_info": {"trainable_params": 16, "all_params": 21, "trainable_percentage": 16 / 21}
    }
