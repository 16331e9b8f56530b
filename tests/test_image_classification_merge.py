"""Merging fine-tuned ViT / ResNet classifiers: backbone-only pool, per-task heads, BatchNorm recompute, CLI."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli
from safetensors.torch import load_file, save_file

from fusion_bench.errors import ConfigError, DatasetError, IncompatibleModelsError, ModelLoadError
from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench.modelpool import HFImageClassificationModelPool
from fusion_bench.modelpool.image_classification import checkpoint_layout_state_dict
from fusion_bench.models.batchnorm import batchnorm_layers, recompute_batchnorm_statistics
from fusion_bench.taskpool import ImageClassificationTaskPool

TASKS = ("shapes", "textures")
BN_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _pool(ex, arch: str, **options) -> HFImageClassificationModelPool:
    models = {"_pretrained_": str(ex.pretrained[arch]), **{t: str(p) for t, p in ex.finetuned[arch].items()}}
    train = {t: {"path": str(p), "split": "train"} for t, p in ex.datasets.items()}
    return HFImageClassificationModelPool(models, train_datasets=train, **options)


def _taskpool(ex, arch: str, **options) -> ImageClassificationTaskPool:
    return ImageClassificationTaskPool(
        {t: {"path": str(p), "split": "test"} for t, p in ex.datasets.items()},
        classification_heads={t: str(p) for t, p in ex.finetuned[arch].items()},
        train_datasets={t: {"path": str(p), "split": "train"} for t, p in ex.datasets.items()},
        **options,
    )


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _pixels(ex, arch: str, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split through the task's fine-tuned checkpoint's own image processor (RGB)."""
    import datasets
    from transformers import AutoImageProcessor

    data = datasets.load_from_disk(str(ex.datasets[task]))[split]
    processor = AutoImageProcessor.from_pretrained(str(ex.finetuned[arch][task]))
    pixels = processor(images=[im.convert("RGB") for im in data["image"]], return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(data["label"])


def _oracle_task_arithmetic(ex, arch: str, lam: float = 0.3) -> dict[str, torch.Tensor]:
    """θ0 + λ Σ (θi − θ0) over the backbone's floating tensors (BatchNorm statistics: θ0's), from the files."""
    base = _weights(ex.pretrained[arch])
    experts = [_weights(ex.finetuned[arch][t]) for t in TASKS]
    out = {}
    for key, value in base.items():
        if key.startswith("classifier.") or key.endswith(BN_SUFFIXES):
            out[key] = value
        else:
            out[key] = value + lam * sum(e[key] - value for e in experts)
    return out


def _oracle_report(ex, arch: str, backbone: dict[str, torch.Tensor], tmp_path) -> dict[str, dict[str, float]]:
    """Each task's checkpoint with its backbone swapped for ``backbone`` (written as a new folder), evaluated by hand."""
    from transformers import AutoModelForImageClassification

    report = {}
    for task in TASKS:
        folder = tmp_path / f"oracle_{arch}_{task}"
        shutil.copytree(ex.finetuned[arch][task], folder)
        weights = _weights(folder)
        weights.update({k: v for k, v in backbone.items() if not k.startswith("classifier.")})
        save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
        model = AutoModelForImageClassification.from_pretrained(str(folder)).eval()
        pixels, labels = _pixels(ex, arch, task, "test")
        with torch.no_grad():
            logits = model(pixel_values=pixels).logits
        report[task] = {
            "accuracy": (logits.argmax(-1) == labels).sum().item() / len(labels),
            "loss": F.cross_entropy(logits, labels).item(),
        }
    return report


# ---- the pool ------------------------------------------------------------------------------------


def test_pool_merges_backbone_only_and_keeps_heads_apart(tiny_classification_example):
    ex = tiny_classification_example
    pool = _pool(ex, "resnet")
    files = {t: _weights(ex.finetuned["resnet"][t]) for t in TASKS}
    backbone = sorted(k for k in files["shapes"] if not k.startswith("classifier.") and not k.endswith(BN_SUFFIXES))
    assert sorted(pool.keys("shapes")) == backbone == sorted(pool.keys("_pretrained_"))
    key = "resnet.encoder.stages.1.layers.0.layer.1.convolution.weight"
    assert torch.equal(pool.get_tensor("textures", key), files["textures"][key])
    assert {k: tuple(v.shape) for k, v in pool.head_state_dict("textures").items()} == {
        "classifier.1.weight": (5, 16),
        "classifier.1.bias": (5,),
    }
    assert [pool.num_classes(n) for n in ("_pretrained_", *TASKS)] == [8, 3, 5]
    with_stats = _pool(ex, "resnet", batchnorm_statistics="merge")
    extra = set(with_stats.keys("shapes")) - set(backbone)
    assert extra and all(k.endswith(("running_mean", "running_var")) for k in extra)  # never num_batches_tracked
    with pytest.raises(
        IncompatibleModelsError, match=r"model 'shapes', tensor 'classifier\.1\.(bias|weight)': shape/dtype \(3"
    ):
        TaskArithmeticAlgorithm().run(_pool(ex, "resnet", heads="merge"))  # heads of 8/3/5 classes are never averaged
    with pytest.raises(ConfigError, match=r"option 'heads' must be one of 'exclude', 'merge'; got 'average'"):
        _pool(ex, "vit", heads="average")


def test_bare_base_model_checkpoint_has_the_classifier_layout(tiny_classification_example, tmp_path):
    from transformers import ViTModel

    ex = tiny_classification_example
    ViTModel.from_pretrained(str(ex.pretrained["vit"])).save_pretrained(
        str(tmp_path / "bare")
    )  # keys without 'vit.', + pooler
    raw = _weights(tmp_path / "bare")
    assert any(k.startswith("pooler.") for k in raw) and not any(k.startswith("vit.") for k in raw)
    pool = HFImageClassificationModelPool(
        {"_pretrained_": str(tmp_path / "bare"), "shapes": str(ex.finetuned["vit"]["shapes"])}
    )
    assert sorted(pool.keys("_pretrained_")) == sorted(pool.keys("shapes"))
    key = "vit.encoder.layer.1.attention.attention.query.weight"
    assert torch.equal(pool.get_tensor("_pretrained_", key), _weights(ex.pretrained["vit"])[key])


# ---- BatchNorm ---------------------------------------------------------------------------------


def _bn_inputs(model, batches) -> list[list[torch.Tensor]]:
    """Per BatchNorm layer, its input in each batch of a forward with BatchNorm in training mode (a copy)."""
    model = copy.deepcopy(model).eval()
    layers = [m for _, m in batchnorm_layers(model)]
    seen: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(args[0].detach().double()))
        for i, m in enumerate(layers)
    ]
    for m in layers:
        m.train()
    with torch.no_grad():
        for batch in batches:
            model(pixel_values=batch)
    for h in hooks:
        h.remove()
    return seen


def test_batchnorm_recompute_gives_the_statistics_of_the_data_through_the_merged_model(tiny_classification_example):
    ex = tiny_classification_example
    merged = TaskArithmeticAlgorithm(scaling_factor=0.3).run(_pool(ex, "resnet"))
    base = _weights(ex.pretrained["resnet"])
    stats_key = "resnet.embedder.embedder.normalization.running_var"
    assert torch.equal(
        checkpoint_layout_state_dict(merged)[stats_key], base[stats_key]
    )  # excluded: the buffer's (θ0's)
    pixels = torch.cat([_pixels(ex, "resnet", t, "train")[0] for t in TASKS])  # (64, 3, 32, 32)

    for batches in ([pixels], [pixels[:32], pixels[32:]]):
        inputs = _bn_inputs(merged, batches)
        model = copy.deepcopy(merged)
        assert recompute_batchnorm_statistics(model, batches, forward=lambda m, x: m(pixel_values=x)) == 64
        for (name, layer), per_batch in zip(batchnorm_layers(model), inputs):
            means = torch.stack([x.mean(dim=(0, 2, 3)) for x in per_batch])  # (batches, C)
            variances = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for x in per_batch])
            torch.testing.assert_close(layer.running_mean.double(), means.mean(0), rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(layer.running_var.double(), variances.mean(0), rtol=1e-5, atol=1e-6, msg=name)
            assert layer.momentum == 0.1 and not layer.training and int(layer.num_batches_tracked) == len(batches)
    first = batchnorm_layers(model)[0][1]
    assert not torch.allclose(first.running_var, base["resnet.embedder.embedder.normalization.running_var"], rtol=0.05)
    naive = TaskArithmeticAlgorithm(scaling_factor=0.3).run(_pool(ex, "resnet", batchnorm_statistics="merge"))
    assert not torch.allclose(
        checkpoint_layout_state_dict(naive)[stats_key], first.running_var, rtol=0.05
    )  # averaging stats is not the data's


def test_taskpool_batchnorm_modes(tiny_classification_example):
    ex = tiny_classification_example
    merged = TaskArithmeticAlgorithm(scaling_factor=0.3).run(_pool(ex, "resnet"))
    reports = {}
    for mode in ("keep", "recompute_per_task", "recompute_shared"):
        taskpool = _taskpool(ex, "resnet", batchnorm=mode, dataloader_kwargs={"batch_size": 16})
        reports[mode] = taskpool.evaluate(merged)
        assert taskpool.evaluation_meta()["batchnorm"] == mode
        assert taskpool.evaluation_meta()["num_samples"] == {"shapes": 12, "textures": 20}
    assert reports["keep"]["shapes"]["loss"] != reports["recompute_per_task"]["shapes"]["loss"]
    # per task: the task's head, statistics from its own training images (batches of 16), then the test set
    taskpool = _taskpool(ex, "resnet")
    model = taskpool.task_model(merged, "textures")
    pixels, _ = _pixels(ex, "resnet", "textures", "train")
    recompute_batchnorm_statistics(model, pixels.split(16), forward=lambda m, x: m(pixel_values=x))
    test_pixels, labels = _pixels(ex, "resnet", "textures", "test")
    with torch.no_grad():
        logits = model.eval()(pixel_values=test_pixels).logits
    assert reports["recompute_per_task"]["textures"]["accuracy"] == pytest.approx(
        (logits.argmax(-1) == labels).sum().item() / len(labels)
    )
    assert reports["recompute_per_task"]["textures"]["loss"] == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-5
    )
    for mode, report in reports.items():
        assert report["average"]["accuracy"] == pytest.approx(sum(report[t]["accuracy"] for t in TASKS) / 2), mode


def test_taskpool_bad_input_is_a_clear_error(tiny_classification_example, tiny_example):
    from transformers import CLIPVisionModel

    ex = tiny_classification_example
    with pytest.raises(ConfigError, match=r"no classification_heads entry for task\(s\) \['textures'\]"):
        ImageClassificationTaskPool(
            {t: str(p) for t, p in ex.datasets.items()},
            classification_heads={"shapes": str(ex.finetuned["vit"]["shapes"])},
        )
    taskpool = _taskpool(ex, "vit")
    with pytest.raises(
        ModelLoadError, match=r"the model to evaluate is a CLIPVisionModel, not a supported image classifier"
    ):
        taskpool.evaluate(CLIPVisionModel.from_pretrained(str(tiny_example.finetuned["mnist"])))
    swapped = ImageClassificationTaskPool(
        {"textures": {"path": str(ex.datasets["textures"]), "split": "test"}},
        classification_heads={"textures": str(ex.finetuned["vit"]["shapes"])},
    )
    with pytest.raises(DatasetError, match=r"test dataset 'textures' has 5 classes but its classification head has 3"):
        swapped.evaluate(_pool(ex, "vit").load_model("_pretrained_"))
    no_train = ImageClassificationTaskPool(
        {"shapes": {"path": str(ex.datasets["shapes"]), "split": "test"}},
        classification_heads={"shapes": str(ex.finetuned["resnet"]["shapes"])},
    )
    with pytest.raises(ConfigError, match=r"batchnorm='recompute_per_task' needs a train dataset for task 'shapes'"):
        no_train.evaluate(_pool(ex, "resnet").load_model("_pretrained_"))


# ---- the CLI -----------------------------------------------------------------------------------


def test_cli_task_arithmetic_on_two_fine_tuned_vits_reports_each_task(tiny_classification_example, tmp_path):
    ex = tiny_classification_example
    report_path, merged_path = tmp_path / "report.json", tmp_path / "merged"
    proc = run_cli(
        [
            "method=task_arithmetic",
            "modelpool=HFImageClassificationModelPool/tiny-vit_example",
            "taskpool=ImageClassificationTaskPool/tiny-vit_example",
            f"report_save_path={report_path}",
            f"merged_model_save_path={merged_path}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(report_path.read_text())
    oracle = _oracle_task_arithmetic(ex, "vit")
    saved = _weights(merged_path)
    assert sorted(saved) == sorted(oracle)
    for key, value in oracle.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert tuple(saved["classifier.weight"].shape) == (8, 32)  # the buffer's (pre-trained) head, untouched
    assert (merged_path / "preprocessor_config.json").is_file()
    expected = _oracle_report(ex, "vit", oracle, tmp_path)
    for task in TASKS:
        assert report[task]["accuracy"] == pytest.approx(expected[task]["accuracy"], abs=1e-9)
        assert report[task]["loss"] == pytest.approx(expected[task]["loss"], rel=1e-5)
    assert report["average"]["accuracy"] == pytest.approx(
        (expected["shapes"]["accuracy"] + expected["textures"]["accuracy"]) / 2
    )
    assert report["meta"]["batchnorm"] == "none in model" and report["meta"]["num_samples"] == {
        "shapes": 12,
        "textures": 20,
    }


def test_cli_finetune_saves_a_checkpoint_the_pool_loads_with_the_same_metrics(tiny_classification_example, tmp_path):
    ex = tiny_classification_example
    report_path, saved = tmp_path / "report.json", tmp_path / "resnet_textures"
    proc = run_cli(
        [
            "method=image_classification_finetune",
            "modelpool=HFImageClassificationModelPool/tiny-resnet_example",
            "method.task=textures",
            "method.max_epochs=2",
            "method.config.batch_size=8",
            "method.config.learning_rate=0.003",
            f"method.save_path={saved}",
            "taskpool=dummy",
            f"report_save_path={report_path}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(report_path.read_text())["image_classification_finetune"]
    assert (
        summary["task"] == "textures" and summary["epochs"] == 2 and summary["steps"] == 2 * 5
    )  # 36 train images, batches of 8
    assert set(summary["test"]) == {"loss", "accuracy", "f1", "precision", "recall"} and "val" in summary
    pool = HFImageClassificationModelPool({"_pretrained_": str(saved)})
    assert pool.num_classes("_pretrained_") == 5
    model = pool.load_model("_pretrained_")
    assert model.config.id2label == dict(enumerate(ex.tasks["textures"]))
    taskpool = ImageClassificationTaskPool(
        {"textures": {"path": str(ex.datasets["textures"]), "split": "test"}}, processor=str(saved), batchnorm="keep"
    )
    report = taskpool.evaluate(model)
    assert report["textures"]["accuracy"] == pytest.approx(summary["test"]["accuracy"], abs=1e-7)
    assert report["textures"]["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-5)


def test_finetune_method_returns_the_best_checkpoint(tiny_classification_example, tmp_path):
    from fusion_bench.method import ImageClassificationFinetuneAlgorithm

    ex = tiny_classification_example
    pool = HFImageClassificationModelPool(
        {"_pretrained_": str(ex.pretrained["resnet"])},
        train_datasets={"textures": {"path": str(ex.datasets["textures"]), "split": "train"}},
    )
    config = {
        "batch_size": 8,
        "learning_rate": 3e-3,
        "val_fraction": 0.2,
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "monitor": "val/accuracy",
        "monitor_mode": "max",
        "early_stopping_patience": 1,
    }
    method = ImageClassificationFinetuneAlgorithm(max_epochs=3, config=config)  # the pool's only task
    model = method.run(pool)
    best = torch.load(method.summary["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[f"model.{key}"]), key
    assert method.summary["task"] == "textures" and "test" not in method.summary  # the pool has no test split
    with pytest.raises(ConfigError, match=r"early_stopping_patience follow 'val/loss' but there is no validation data"):
        ImageClassificationFinetuneAlgorithm(config={"val_fraction": 0.0, "early_stopping_patience": 2}).run(pool)
    with pytest.raises(ConfigError, match=r"config: unknown field\(s\) 'lr'; valid fields: model_name, num_classes"):
        ImageClassificationFinetuneAlgorithm(config={"lr": 0.1})
