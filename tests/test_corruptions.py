"""Image corruptions: parameter tables, exact formulas, determinism per image, severity, dataset wrapping, errors."""

from __future__ import annotations

import io
import zlib

import datasets
import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from fusion_bench.data.corruptions import (
    CORRUPTIONS,
    TABLES,
    CorruptedImageDataset,
    CorruptionSpec,
    _canny,
    _equalize_hist,
    corrupt,
    corruption_rng,
)
from fusion_bench.data.loading import load_dataset_from_config
from fusion_bench.errors import ConfigError, DatasetError
from fusion_bench.testing.tiny_datasets import _class_image

RANDOM = ("gaussian_noise", "impulse_noise", "motion_blur", "spatter")


def images(size: int, n: int = 6, mode: str = "RGB") -> list[Image.Image]:
    rng = np.random.default_rng(123)
    return [_class_image(rng, label, 8, size, mode) for label in range(n)]


def mean_abs_change(corruption: str, severity: int, table: str, imgs: list[Image.Image]) -> float:
    out = [
        corrupt(im, corruption, severity, rng=corruption_rng(0, i, corruption), table=table)
        for i, im in enumerate(imgs)
    ]
    return float(np.mean([np.abs(np.asarray(o, float) - np.asarray(im, float)).mean() for o, im in zip(out, imgs)]))


def test_tables_are_the_papers():
    assert CORRUPTIONS == (
        "contrast",
        "gaussian_noise",
        "impulse_noise",
        "jpeg_compression",
        "motion_blur",
        "pixelate",
        "spatter",
    )
    assert TABLES["imagenet"]["gaussian_noise"] == (0.08, 0.12, 0.18, 0.26, 0.38)
    assert TABLES["imagenet"]["motion_blur"][4] == (20, 15) and TABLES["cifar"]["motion_blur"][0] == (6, 1)
    assert TABLES["imagenet"]["jpeg_compression"] == (25, 18, 15, 10, 7) and TABLES["cifar"]["pixelate"][-1] == 0.65
    assert TABLES["imagenet"]["spatter"][3] == (0.65, 0.3, 1, 0.65, 1.5, 1) and TABLES["cifar"]["contrast"][0] == 0.75
    assert all(len(t[c]) == 5 for t in TABLES.values() for c in CORRUPTIONS)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("table, size", [("imagenet", 64), ("cifar", 32)])
def test_deterministic_per_image_and_keeps_size_mode_dtype(corruption, table, size):
    img = images(size, 1)[0]
    a = corrupt(img, corruption, 3, rng=corruption_rng(7, 5, corruption), table=table)
    b = corrupt(img, corruption, 3, rng=corruption_rng(7, 5, corruption), table=table)
    assert isinstance(a, Image.Image) and (a.size, a.mode) == (img.size, img.mode)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    other = np.asarray(corrupt(img, corruption, 3, rng=corruption_rng(7, 6, corruption), table=table))
    assert np.array_equal(np.asarray(a), other) == (corruption not in RANDOM)  # another index: other noise
    for arr in (np.asarray(img), np.asarray(img.convert("L")), np.asarray(img.convert("L"))[..., None]):
        out = corrupt(arr, corruption, 5, rng=corruption_rng(0, 0, corruption), table=table)
        assert out.shape == arr.shape and out.dtype == np.uint8
    gray = corrupt(
        img.convert("L").resize((size, size // 2 + 3)), corruption, 2, rng=corruption_rng(0, 0, corruption), table=table
    )
    assert (gray.mode, gray.size) == ("L", (size, size // 2 + 3))


@pytest.mark.parametrize("corruption", CORRUPTIONS)
@pytest.mark.parametrize("table, size", [("imagenet", 224), ("cifar", 32)])  # each table at its calibration size
def test_change_is_measurable_and_grows_with_severity(corruption, table, size):
    imgs = images(size)
    change = [mean_abs_change(corruption, s, table, imgs) for s in range(1, 6)]
    assert change[0] > 0.5  # grey levels, averaged over pixels and images
    if corruption == "spatter":  # the paper's table: water splashes at 1-3, mud at 4-5; each grows
        assert change[0] < change[1] < change[2] and change[3] < change[4]
    else:  # non-decreasing (CIFAR's motion blur 3 and 4 differ by a kernel tail of ~1e-4), growing overall
        assert all(b >= a - 1e-3 for a, b in zip(change, change[1:])) and change[4] > change[0] + 1.0


def test_exact_formulas_against_hand_computation():
    arr = np.array([[[0, 100, 200], [50, 150, 250]], [[10, 20, 30], [255, 0, 128]]], np.uint8)  # (2, 2, 3)
    x = arr / 255.0
    mean = x.mean(axis=(0, 1))
    expected = (np.clip((x - mean) * 0.2 + mean, 0, 1) * 255).astype(np.uint8)  # imagenet severity 3
    assert np.array_equal(corrupt(arr, "contrast", 3, rng=corruption_rng(0, 0, "contrast")), expected)
    noise = np.random.default_rng([4, 9, zlib.crc32(b"gaussian_noise")]).normal(size=x.shape, scale=0.38)
    expected = (np.clip(x + noise, 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(corrupt(arr, "gaussian_noise", 5, rng=corruption_rng(4, 9, "gaussian_noise")), expected)
    img = images(40, 1)[0]
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=40)  # cifar severity 5
    assert np.array_equal(
        np.asarray(corrupt(img, "jpeg_compression", 5, rng=corruption_rng(0, 0, "x"), table="cifar")),
        np.asarray(Image.open(buffer)),
    )
    expected = img.resize((int(40 * 0.4), int(40 * 0.4)), Image.BOX).resize((40, 40), Image.BOX)
    assert np.array_equal(np.asarray(corrupt(img, "pixelate", 3, rng=corruption_rng(0, 0, "x"))), np.asarray(expected))


def test_impulse_noise_sets_the_tables_fraction_to_black_or_white():
    grey = np.full((200, 200, 3), 128, np.uint8)
    out = corrupt(grey, "impulse_noise", 5, rng=corruption_rng(0, 0, "impulse_noise"))  # amount 0.27
    assert abs((out != 128).mean() - 0.27) < 0.01 and abs((out == 255).mean() - 0.135) < 0.01
    assert set(np.unique(out)) == {0, 128, 255}


def test_motion_blur_is_imagemagicks_one_sided_gaussian_kernel():
    delta = np.zeros((41, 41), np.uint8)
    delta[20, 20] = 255
    out = corrupt(delta, "motion_blur", 1, rng=corruption_rng(3, 1, "motion_blur")).astype(float)  # (10, 3)
    angle = np.deg2rad(corruption_rng(3, 1, "motion_blur").uniform(-45, 45))
    steps = np.arange(21)
    weights = np.exp(-(steps**2) / 18.0)
    weights /= weights.sum()
    expected = np.zeros((41, 41))
    for i, w in enumerate(weights):  # out(p) = sum_i w_i * in(p + offset_i): the delta lands at 20 - offset_i
        expected[20 - int(np.ceil(i * np.sin(angle) - 0.5)), 20 - int(np.ceil(i * np.cos(angle) - 0.5))] += 255 * w
    assert np.abs(out - expected).max() <= 1.0  # uint8 truncation


def test_canny_and_equalize_hist_match_opencv_outputs():
    img = np.zeros((12, 12), np.uint8)
    img[3:9, 4:10], img[5, 6], img[2, 2] = 200, 230, 120
    # cv2.Canny(img, 50, 150) (OpenCV 5.0), recorded
    opencv = [
        (1, 1),
        (1, 2),
        (1, 3),
        (2, 1),
        (2, 5),
        (2, 6),
        (2, 7),
        (2, 8),
        (3, 1),
        (3, 2),
        (3, 4),
        (3, 9),
        (4, 3),
        (4, 9),
        (5, 3),
        (5, 9),
        (6, 3),
        (6, 9),
        (7, 3),
        (7, 9),
        (8, 4),
        (8, 5),
        (8, 6),
        (8, 7),
        (8, 8),
        (8, 9),
    ]
    assert sorted(map(tuple, np.argwhere(_canny(img, 50, 150)).tolist())) == opencv
    hist = np.array([[0, 0, 5, 5], [5, 7, 7, 9], [9, 9, 9, 200]], np.uint8)
    assert _equalize_hist(hist).tolist() == [
        [0, 0, 76, 76],
        [76, 128, 128, 230],
        [230, 230, 230, 255],
    ]  # cv2.equalizeHist


@pytest.fixture()
def saved_dataset(tmp_path):
    imgs = images(32, 10)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    ds = datasets.Dataset.from_dict({"image": imgs, "label": list(range(10))}, features=features)
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds", imgs


def test_dataset_entry_corrupts_each_image_with_its_own_noise_in_any_order(saved_dataset):
    path, imgs = saved_dataset
    entry = {"path": str(path), "corruption": "gaussian_noise", "severity": 4, "seed": 3, "table": "cifar"}
    ds = load_dataset_from_config(entry, split="test", what="test dataset 'x'")
    assert isinstance(ds, CorruptedImageDataset) and len(ds) == 10 and ds.column_names == ["image", "label"]
    expected = [
        np.asarray(
            corrupt(
                im, "gaussian_noise", 4, rng=np.random.default_rng([3, i, zlib.crc32(b"gaussian_noise")]), table="cifar"
            )
        )
        for i, im in enumerate(imgs)
    ]
    seen = {}
    for rows in DataLoader(ds, batch_size=3, shuffle=True, num_workers=2, collate_fn=list):
        for row in rows:
            seen[row["label"]] = np.asarray(row["image"])
    assert sorted(seen) == list(range(10)) and all(np.array_equal(seen[i], expected[i]) for i in range(10))
    subset = ds.select([7, 2])  # keeps each row's original noise
    assert np.array_equal(np.asarray(subset[0]["image"]), expected[7]) and subset[1]["label"] == 2
    assert np.array_equal(np.asarray(ds["image"][5]), expected[5]) and ds["label"] == list(range(10))
    clean = load_dataset_from_config({"path": str(path), "corruption": None, "severity": 4}, split="test", what="x")
    assert not isinstance(clean, CorruptedImageDataset)


def test_crop_size_resizes_and_centre_crops_before_corrupting():
    img = images(40, 1)[0].resize((60, 40))
    out = CorruptionSpec("contrast", 1, crop_size=24).apply(img, 0)
    crop = img.resize((36, 24), Image.BICUBIC).crop((6, 0, 30, 24))
    assert out.size == (24, 24)
    assert np.array_equal(
        np.asarray(out), np.asarray(corrupt(crop, "contrast", 1, rng=corruption_rng(0, 0, "contrast")))
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"corruption": "fog", "severity": 1},
            r"test dataset 'x': unknown corruption 'fog'; choose one of contrast, gaussian_noise",
        ),
        ({"corruption": "contrast", "severity": 6}, r"corruption severity must be an integer 1-5, got 6"),
        ({"corruption": "contrast"}, r"corruption severity must be an integer 1-5, got None"),
        ({"corruption": "contrast", "severity": "3"}, r"severity must be an integer 1-5, got '3'"),
        (
            {"corruption": "contrast", "severity": 3, "table": "tiny"},
            r"unknown corruption table 'tiny'; choose one of imagenet, cifar",
        ),
        (
            {"corruption": "contrast", "severity": 3, "seed": -1},
            r"corruption seed must be a non-negative integer, got -1",
        ),
        (
            {"corruption": "contrast", "severity": 3, "crop_size": 0},
            r"crop_size must be a positive integer or null, got 0",
        ),
    ],
)
def test_bad_corruption_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        CorruptionSpec.pop_from({"path": "p", **options}, what="test dataset 'x'")


def test_bad_options_fail_when_pools_are_built_before_any_loading(tiny_example):
    from fusion_bench.modelpool import CLIPVisionModelPool
    from fusion_bench.taskpool import CLIPVisionModelTaskPool

    bad = {"path": "/nowhere/not/loaded", "corruption": "contrast", "severity": 9}
    with pytest.raises(ConfigError, match=r"^test dataset 'mnist': corruption severity must be an integer 1-5, got 9$"):
        CLIPVisionModelTaskPool({"mnist": bad}, clip_model=str(tiny_example.base_model))
    with pytest.raises(ConfigError, match=r"^train dataset 'mnist': corruption severity"):
        CLIPVisionModelPool({"_pretrained_": str(tiny_example.base_model)}, train_datasets={"mnist": bad})
    with pytest.raises(DatasetError, match=r"expected a PIL image or a uint8"):
        corrupt(np.zeros((4, 4, 2), np.uint8), "contrast", 1, rng=corruption_rng(0, 0, "contrast"))
