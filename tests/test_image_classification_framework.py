"""The Lightning image-classification framework (fusion_bench.tasks) on tiny random ViT / ResNet models."""

from __future__ import annotations


import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion_bench.errors import ConfigError, DatasetError, ModelLoadError
from fusion_bench.tasks.classification import (
    ClassificationMetricLogger,
    ClassificationModule,
    ImageClassificationDataModule,
    ResNetProcessor,
    ViTProcessor,
    build_callbacks,
)
from fusion_bench.tasks.classification.lightning_module import WarmupDecay
from fusion_bench.tasks.common.base_module import BaseConfig
from fusion_bench.testing.tiny_classifiers import build_tiny_resnet, build_tiny_vit
from fusion_bench.testing.tiny_clip import build_tiny_image_dataset

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny ViT and ResNet (2-class heads) and 3-class RGB / grayscale datasets."""
    root = tmp_path_factory.mktemp("tiny_classifiers")
    return {
        "vit": build_tiny_vit(root / "vit", num_labels=2, seed=0),
        "resnet": build_tiny_resnet(root / "resnet", num_labels=2, seed=0),
        "rgb": build_tiny_image_dataset(
            root / "rgb", classnames=CLASSES, n_train_per_class=8, n_test_per_class=4, seed=1
        ),
        "gray": build_tiny_image_dataset(
            root / "gray", classnames=CLASSES, n_train_per_class=2, n_test_per_class=2, seed=2, mode="L"
        ),
    }


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        **kwargs,
    )


# ---- metrics ---------------------------------------------------------------------------------


def _numpy_metrics(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro precision/recall/F1 over the classes seen in targets or predictions, confusion matrix."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, preds), 1)
    tp = np.diag(cm).astype(float)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    seen = (tp + fp + fn) > 0
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=seen)
    return {
        "accuracy": tp.sum() / len(labels),
        "precision": precision[seen].mean(),
        "recall": recall[seen].mean(),
        "f1": f1[seen].mean(),
        "confusion_matrix": cm.tolist(),
    }


def test_metric_logger_matches_numpy_oracle_and_saves_the_figure(tmp_path):
    # 5 classes: class 3 is predicted but never true (precision 0), class 4 never occurs (left out of macro means)
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    preds = np.array([0, 1, 1, 1, 3, 2, 0, 0, 3, 2])
    logits = F.one_hot(torch.tensor(preds), 5).float() * 3.0 - 1.0
    logger = ClassificationMetricLogger(BaseConfig(model_name="x", num_classes=5, output_dir=str(tmp_path)))
    logger.update("val", logits[:6], torch.tensor(labels[:6]))  # two batches accumulate
    logger.update("val", torch.tensor(preds[6:]), torch.tensor(labels[6:]))  # class indices work too
    record = logger.log_epoch(None, "val", epoch=2)
    expected = _numpy_metrics(preds, labels, 5)
    assert record["confusion_matrix"] == expected["confusion_matrix"]
    for key in ("accuracy", "precision", "recall", "f1"):
        assert record[key] == pytest.approx(expected[key], abs=1e-6), key
    assert (record["accuracy"], record["precision"], record["recall"]) == pytest.approx(
        (0.6, 7 / 12, 11 / 24)
    )  # by hand
    assert logger.history["val"] == [record]
    from PIL import Image

    figure = tmp_path / "val_epoch002.png"
    assert logger.figures == [figure] and Image.open(figure).format == "PNG"
    assert not logger.has_updates("val") and logger.log_epoch(None, "test", epoch=0) is None  # reset; no test batch
    with pytest.raises(ConfigError, match=r"unknown stage 'eval'; stages: train, val, test"):
        logger.update("eval", logits, torch.tensor(labels))
    with pytest.raises(ConfigError, match=r"set BaseConfig.num_classes"):
        ClassificationMetricLogger(BaseConfig(model_name="x"))


def test_warmup_cosine_linear_factors():
    cosine = WarmupDecay("cosine", warmup_steps=2, total_steps=10)
    assert [cosine(s) for s in (0, 1, 2, 6, 10, 12)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0, 0.0])
    linear = WarmupDecay("linear", warmup_steps=0, total_steps=4)
    assert [linear(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert WarmupDecay("constant", warmup_steps=4, total_steps=0)(1) == 0.25


# ---- processors and heads ------------------------------------------------------------------


def test_processors_convert_grayscale_and_replace_heads_seeded(tiny):
    import datasets

    gray = datasets.load_from_disk(str(tiny["gray"]))["train"]["image"][:2]
    assert gray[0].mode == "L"
    processor = ViTProcessor(BaseConfig(model_name=str(tiny["vit"]), num_classes=3, seed=7))
    pixels = processor(gray)["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)  # grayscale replicated to RGB, not an error
    assert torch.equal(
        pixels, processor.image_processor(images=[g.convert("RGB") for g in gray], return_tensors="pt")["pixel_values"]
    )
    vit_a, vit_b = processor.load_model(str(tiny["vit"])), processor.load_model(str(tiny["vit"]))
    assert tuple(vit_a.classifier.weight.shape) == (3, 32) and vit_a.config.num_labels == 3
    assert torch.equal(vit_a.classifier.weight, vit_b.classifier.weight)  # seeded by config.seed
    assert vit_a.classifier.weight.std().item() == pytest.approx(0.02, rel=0.3) and not vit_a.classifier.bias.any()
    resnet = ResNetProcessor(BaseConfig(model_name=str(tiny["resnet"]), num_classes=5, class_names=list("vwxyz")))
    model = resnet.load_model(str(tiny["resnet"]))
    assert isinstance(model.classifier[0], torch.nn.Flatten) and tuple(model.classifier[1].weight.shape) == (5, 16)
    assert model.config.id2label == dict(enumerate("vwxyz"))
    kept = ViTProcessor(BaseConfig(model_name=str(tiny["vit"]))).load_model(
        str(tiny["vit"])
    )  # num_classes None: own head
    assert kept.config.num_labels == 2


def test_image_size_a_model_cannot_take_is_a_clear_error(tiny):
    bigger = ViTProcessor(BaseConfig(model_name=str(tiny["vit"]), image_size=48))
    with pytest.raises(
        ConfigError, match=r"the ViT takes 32x32 images .* image_size=48 gives 48x48; set image_size to 32 or null"
    ):
        bigger.load_model(str(tiny["vit"]))
    resnet = ResNetProcessor(BaseConfig(model_name=str(tiny["resnet"]), image_size=48, num_classes=3))
    model = resnet.load_model(str(tiny["resnet"]))  # ResNets pool adaptively: any size is resized to and taken
    from PIL import Image

    pixels = resnet([Image.new("RGB", (20, 30))])["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 48, 48) and tuple(model(pixels).logits.shape) == (1, 3)
    with pytest.raises(ConfigError, match=r"is a 'resnet' model, not 'vit'; use ResNetProcessor"):
        ViTProcessor(BaseConfig(model_name=str(tiny["vit"]))).load_model(str(tiny["resnet"]))
    with pytest.raises(ModelLoadError, match=r"cannot load 'nobody/no-such-model'"):
        ViTProcessor(BaseConfig(model_name="nobody/no-such-model"))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"learning_rate": 0}, r"'learning_rate' must be a number > 0; got 0"),
        ({"scheduler": "step"}, r"'scheduler' must be one of 'cosine', 'linear', 'constant', 'plateau'; got 'step'"),
        ({"scheduler": "plateau", "warmup_steps": 5}, r"'warmup_steps' does not combine with scheduler 'plateau'"),
        ({"num_classes": 2, "class_names": ["a", "b", "c"]}, r"3 'class_names' given for num_classes=2"),
        ({"random_resized_crop": 1.5}, r"'random_resized_crop' must be a number > 0 and <= 1; got 1.5"),
    ],
)
def test_base_config_rejects_bad_values(fields, message):
    with pytest.raises(ConfigError, match=message):
        BaseConfig(model_name="x", **fields)


# ---- data module: labels -------------------------------------------------------------------


def test_num_classes_not_matching_the_labels_is_a_clear_error(tiny, tmp_path):
    import datasets

    processor = ViTProcessor(BaseConfig(model_name=str(tiny["vit"]), num_classes=5))
    with pytest.raises(
        DatasetError, match=r"its 'label' ClassLabel has 3 classes but num_classes=5; set num_classes=3"
    ):
        ImageClassificationDataModule(str(tiny["rgb"]), processor=processor).setup("fit")
    plain = datasets.load_from_disk(str(tiny["rgb"]))["train"]
    plain = plain.cast_column("label", datasets.Value("int64")).rename_column("label", "target")
    small = ViTProcessor(BaseConfig(model_name=str(tiny["vit"]), num_classes=2))
    dm = ImageClassificationDataModule({"train": plain}, processor=small, label_column="target")
    with pytest.raises(DatasetError, match=r"label 2 is out of range for num_classes=2"):
        dm.setup("fit")
    # a module whose head is smaller than the dataset's classes fails before training, naming the fix
    module = ClassificationModule(model_ckpt=str(tiny["vit"]), config=BaseConfig(model_name=str(tiny["vit"])))
    dm = ImageClassificationDataModule(str(tiny["rgb"]), processor=module.processor)
    with pytest.raises(DatasetError, match=r"the dataset has 3 classes but the model's head has 2; set num_classes=3"):
        _trainer(tmp_path, max_epochs=1).fit(module, dm)


# ---- training --------------------------------------------------------------------------------


def _train_set_loss(module: ClassificationModule, dm: ImageClassificationDataModule) -> float:
    """Mean cross-entropy over the training split, eval mode, no augmentation (independent of Lightning)."""
    from torch.utils.data import DataLoader

    from fusion_bench.data.loading import ImageClassificationCollate

    loader = DataLoader(dm.splits["train"], batch_size=64, collate_fn=ImageClassificationCollate(module.processor))
    module.eval()
    with torch.no_grad():
        total = sum(F.cross_entropy(module(x), y, reduction="sum").item() for x, y in loader)
    return total / len(dm.splits["train"])


def test_seed_example_trains_logs_checkpoints_and_round_trips(tiny, tmp_path):
    from fusion_bench.modelpool import HFImageClassificationModelPool
    from fusion_bench.taskpool import ImageClassificationTaskPool

    config = BaseConfig(
        model_name=str(tiny["vit"]),
        num_classes=3,
        learning_rate=3e-3,
        batch_size=8,
        scheduler="cosine",
        warmup_steps=1,
        val_fraction=0.25,
        seed=0,
        checkpoint_dir=str(tmp_path / "ckpt"),
        early_stopping_patience=10,
        horizontal_flip=True,
    )
    processor = ViTProcessor(config)
    module = ClassificationModule(
        model_ckpt=config.model_name,
        config=config,
        processor=processor,
        metric_logger=ClassificationMetricLogger(config),
    )
    datamodule = ImageClassificationDataModule(str(tiny["rgb"]), processor=processor)
    datamodule.setup("fit")
    assert (len(datamodule.splits["train"]), len(datamodule.splits["val"])) == (18, 6)  # 24 train images, 25% held out
    before = _train_set_loss(module, datamodule)
    callbacks = build_callbacks(config)
    trainer = _trainer(tmp_path, max_epochs=4, callbacks=callbacks)
    trainer.fit(module, datamodule)
    after = _train_set_loss(module, datamodule)
    assert after < 0.8 * before, (before, after)
    history = module.metric_logger.history
    assert [r["epoch"] for r in history["train"]] == [0, 1, 2, 3] and len(history["val"]) == 4  # no sanity-check epoch
    assert trainer.callback_metrics["val/accuracy"].item() == pytest.approx(history["val"][-1]["accuracy"])
    assert sum(map(sum, history["val"][-1]["confusion_matrix"])) == 6
    assert (tmp_path / "confusion_matrix" / "val_epoch003.png").is_file()
    best = callbacks[0].best_model_path
    assert best.startswith(str(tmp_path / "ckpt")) and (tmp_path / "ckpt" / "last.ckpt").is_file()
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(
        0.0, abs=1e-12
    )  # cosine decayed to 0 at the end

    tested = trainer.test(module, datamodule, verbose=False)[0]
    saved = module.save_pretrained(tmp_path / "vit_rgb")
    pool = HFImageClassificationModelPool({"_pretrained_": str(saved)})
    taskpool = ImageClassificationTaskPool({"rgb": {"path": str(tiny["rgb"]), "split": "test"}}, processor=str(saved))
    report = taskpool.evaluate(pool.load_model("_pretrained_"))
    assert report["rgb"]["accuracy"] == pytest.approx(tested["test/accuracy"], abs=1e-7)
    assert report["rgb"]["loss"] == pytest.approx(tested["test/loss"], rel=1e-5)
    assert module.metric_logger.history["test"][-1]["accuracy"] == pytest.approx(tested["test/accuracy"])
