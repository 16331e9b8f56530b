"""The offline benchmark's second design: eight generated image domains, captions, datasets, build."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusion_bench.data.mini_tasks import v2
from fusion_bench.data.mini_tasks.domains import DOMAINS, render

TASKS = ["scenes", "vehicles", "aerial", "landcover", "house_numbers", "signs", "handwritten", "textures"]
NUM_CLASSES = {
    "scenes": 8,
    "vehicles": 8,
    "aerial": 8,
    "landcover": 8,
    "house_numbers": 10,
    "signs": 8,
    "handwritten": 10,
    "textures": 8,
}


def test_domains_are_the_eight_tasks_with_their_class_counts_and_prompts():
    assert list(DOMAINS) == TASKS == list(v2.TASKS_V2)
    for name, domain in DOMAINS.items():
        assert len(domain.classnames) == NUM_CLASSES[name] == len(set(domain.classnames)), name
        assert domain.templates and all(t.count("{}") == 1 for t in domain.templates), name


@pytest.mark.parametrize("task", TASKS)
def test_render_is_a_pure_function_of_the_generator_and_classes_differ(task):
    images = [render(np.random.default_rng([5, label]), task, label) for label in range(NUM_CLASSES[task])]
    again = [render(np.random.default_rng([5, label]), task, label) for label in range(NUM_CLASSES[task])]
    for image, same in zip(images, again):
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        assert np.array_equal(image, same)
        assert image.std() > 3  # not a blank canvas
    other = render(np.random.default_rng([6, 0]), task, 0)
    assert not np.array_equal(images[0], other)  # the nuisance parameters come from the generator


def test_task_images_are_balanced_seeded_and_test_digits_are_held_out():
    images, labels = v2.sample_task_images("signs", "train", 16, seed=3)
    assert images.shape == (16, 32, 32, 3) and sorted(labels.tolist()) == sorted(list(range(8)) * 2)
    again, _ = v2.sample_task_images("signs", "train", 16, seed=3)
    test, _ = v2.sample_task_images("signs", "test", 16, seed=3)
    assert np.array_equal(images, again) and not np.array_equal(images, test)
    from fusion_bench.data.mini_tasks.scenes import digit_pool

    for digit in range(10):
        train, held_out = digit_pool("train", digit), digit_pool("test", digit)
        assert not (train[:, None] == held_out[None]).all(axis=(2, 3)).any()


def test_captions_name_the_class_or_the_domain_and_the_tokenizer_corpus_covers_them():
    rng = np.random.default_rng(0)
    for task, domain in DOMAINS.items():
        named = [v2.caption_v2(rng, task, 1, class_mention=1.0) for _ in range(20)]
        assert all(domain.classnames[1] in c for c in named), task
        generic = [v2.caption_v2(rng, task, 1, class_mention=0.0) for _ in range(20)]
        assert all(domain.noun in c for c in generic), task
    words = {
        w
        for text in v2.tokenizer_corpus_v2()
        for w in text.replace('"', " ").replace(".", " ").replace(",", " ").split()
    }
    for domain in DOMAINS.values():
        for name in domain.classnames:
            assert set(name.split()) <= words


def test_pretraining_pool_has_every_domain_equally_and_differs_from_the_tasks_splits():
    images, tasks, labels = v2.pretraining_pool(seed=0, per_task=3)
    assert images.shape == (24, 32, 32, 3) and np.bincount(tasks).tolist() == [3] * 8
    assert all(0 <= label < NUM_CLASSES[TASKS[t]] for t, label in zip(tasks, labels))
    train, _ = v2.sample_task_images("textures", "train", 3, seed=0)
    assert not any(np.array_equal(a, b) for a in images[tasks == 7] for b in train)


def test_pretraining_pool_keeps_the_tasks_appearance_for_a_share_of_the_images():
    tasks_look, tasks, labels = v2.pretraining_pool(seed=0, per_task=40, task_appearance=1.0)
    mixed, tasks_again, labels_again = v2.pretraining_pool(seed=0, per_task=40, task_appearance=0.25)
    assert np.array_equal(tasks, tasks_again) and np.array_equal(labels, labels_again)
    kept = np.array([np.array_equal(a, b) for a, b in zip(tasks_look, mixed)])
    rotated = np.array([np.array_equal(a[..., (1, 2, 0)], b) for a, b in zip(tasks_look, mixed)])
    assert (kept | rotated).all()  # each image is either as the task renders it or in the pool's colours
    scenes = tasks == TASKS.index("scenes")
    assert 4 <= kept[scenes].sum() <= 20 and rotated[scenes].sum() == 40 - kept[scenes].sum()
    assert kept[tasks == TASKS.index("handwritten")].all()  # grey digits look the same either way
    image = tasks_look[0]
    assert np.array_equal(v2.pool_appearance(image)[..., 0], image[..., 1])


def test_pretraining_pool_lowers_the_contrast_of_the_domains_the_colour_change_leaves_alone():
    full, tasks, labels = v2.pretraining_pool(seed=0, per_task=20, task_appearance=0.0, contrast=1.0)
    low, tasks_again, labels_again = v2.pretraining_pool(seed=0, per_task=20, task_appearance=0.0, contrast=0.4)
    assert np.array_equal(tasks, tasks_again) and np.array_equal(labels, labels_again)
    for t, task in enumerate(TASKS):
        a, b = full[tasks == t], low[tasks == t]
        if task not in v2.POOL_CONTRAST_DOMAINS:
            assert np.array_equal(a, b), task
            continue
        for image, lowered in zip(a, b):  # same picture, 40% of its spread around its mean grey level
            assert abs(lowered.astype(float).std() - 0.4 * image.astype(float).std()) < 1.0, task
            assert abs(lowered.astype(float).mean() - image.astype(float).mean()) < 1.0, task
    kept, _, _ = v2.pretraining_pool(seed=0, per_task=20, task_appearance=1.0, contrast=0.4)
    assert np.array_equal(kept, v2.pretraining_pool(seed=0, per_task=20, task_appearance=1.0)[0])
    image = full[0]
    assert v2.pool_contrast(image, 1.0) is image  # 1.0 leaves the image as it is


def test_pretraining_pool_tints_house_numbers_and_textures_instead_of_lowering_their_contrast():
    low, tasks, labels = v2.pretraining_pool(seed=0, per_task=20, task_appearance=0.0, contrast=0.4)
    tinted, tasks_again, labels_again = v2.pretraining_pool(
        seed=0, per_task=20, task_appearance=0.0, contrast=0.4, tint=0.3
    )
    rotated, _, _ = v2.pretraining_pool(seed=0, per_task=20, task_appearance=0.0, contrast=1.0)
    assert np.array_equal(tasks, tasks_again) and np.array_equal(labels, labels_again)
    assert set(v2.POOL_TINT_DOMAINS) <= set(v2.POOL_CONTRAST_DOMAINS)
    for t, task in enumerate(TASKS):
        a, b = low[tasks == t], tinted[tasks == t]
        if task not in v2.POOL_TINT_DOMAINS:  # the other domains keep the contrast gap (or none)
            assert np.array_equal(a, b), task
            continue
        full = rotated[tasks == t]  # the tint replaces the contrast gap: green and blue as rendered, red × 0.3
        assert np.array_equal(b[..., 1:], full[..., 1:]), task
        assert np.abs(b[..., 0].astype(int) - (full[..., 0] * 0.3).astype(int)).max() <= 1, task
    image = low[0]
    assert v2.pool_tint(image, 1.0) is image


def test_build_cli_refuses_a_share_outside_0_1(tmp_path, capsys):
    from fusion_bench.scripts.build_mini_clip import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--design", "v2", "--out", str(tmp_path / "b"), "--pretrain-task-appearance", "1.5"])
    assert exit_info.value.code == 2
    assert "--pretrain-task-appearance must be in [0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--design", "v2", "--out", str(tmp_path / "b"), "--pool-contrast", "-0.1"])
    assert exit_info.value.code == 2
    assert "--pool-contrast must be in [0, 1], got -0.1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--design", "v2", "--out", str(tmp_path / "b"), "--pool-tint", "1.2"])
    assert exit_info.value.code == 2
    assert "--pool-tint must be in [0, 1], got 1.2" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_dataset_has_image_and_label_columns():
    ds = v2.build_task_dataset_v2("handwritten", n_train=10, n_test=10, seed=1)
    assert ds["train"].features["label"].names == list(DOMAINS["handwritten"].classnames)
    assert sorted(ds["test"]["label"]) == list(range(10))
    image = ds["test"][0]["image"]
    assert image.size == (32, 32) and image.mode == "RGB"


SMOKE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "text_num_layers": 1,
    "num_heads": 2,
    "pretrain_images_per_task": 48,
    "pretrain_steps": 80,
    "pretrain_batch_size": 32,
    "pretrain_learning_rate": 5e-3,
    "finetune_steps": 20,
    "finetune_batch_size": 16,
    "finetune_learning_rate": 3e-3,
    "n_train": 64,
    "n_test": 40,
}


def test_build_v2_is_deterministic_and_writes_its_recipe(tmp_path):
    from fusion_bench.scripts.build_mini_clip_v2 import (
        MiniClipRecipeV2,
        build_mini_clip_v2,
    )

    recipe = MiniClipRecipeV2(**{**SMOKE, "pretrain_steps": 2, "finetune_steps": 2})
    digests = []
    for out in (tmp_path / "a", tmp_path / "b"):
        build_mini_clip_v2(out, recipe, tasks=["signs"])
        build = json.loads((out / "BUILD.json").read_text())
        digests.append(build["files"])
        assert sorted(p.name for p in out.iterdir()) == [
            ".fusion_bench_output.json",
            "BUILD.json",
            "clip-mini",
            "clip-mini_signs",
        ]
        assert build["design"] == 2 and build["recipe"]["pretrain_steps"] == 2 and build["tasks"] == ["signs"]
    assert digests[0] == digests[1]
    with pytest.raises(ValueError, match=r"unknown design-2 tasks \['shape'\]"):
        build_mini_clip_v2(tmp_path / "c", recipe, tasks=["shape"])
    assert not (tmp_path / "c").exists()


def test_smoke_build_v2_orders_like_the_benchmark(tmp_path):
    """A shrunk build (about 20 s): the experts beat the pre-trained model on their own tasks, a merge
    (simple averaging, task arithmetic or TIES) lands between the two, and a linear probe on pre-trained
    features tells the tasks' images apart far above chance (12.5%). Measured on this recipe (one thread):
    pre-trained 14.4, experts 38.4, simple averaging 25.6, task arithmetic 23.4, TIES 21.6, probe 77%."""
    from fusion_bench.scripts.build_mini_clip_v2 import (
        MiniClipRecipeV2,
        build_mini_clip_v2,
    )
    from fusion_bench.scripts.mini_clip_signals import MiniClipSignals, measure_signals

    build_mini_clip_v2(tmp_path / "build", MiniClipRecipeV2(**SMOKE))
    signals = measure_signals(MiniClipSignals(tmp_path / "build", n_test=40, n_probe=40), pairs=[("aerial", "signs")])
    assert signals["tasks"] == TASKS
    pretrained = signals["pretrained"]["avg"]
    assert signals["experts"]["avg"] > pretrained + 10
    best_merge = max(signals[row]["avg"] for row in ("simple_average", "task_arithmetic_0.3", "ties_0.3"))
    assert pretrained + 4 < best_merge < signals["experts"]["avg"]
    assert signals["task_probe"] >= 50
    for row in ("simple_average", "task_arithmetic_0.3", "ties_0.3", "single_expert_0.3", "routing_bound"):
        assert set(signals[row]) == {*TASKS, "avg"}
    # a perfect router over the merge adds back each expert's MLPs: never far below the merge it starts from
    assert signals["routing_bound"]["avg"] >= signals["task_arithmetic_0.3"]["avg"] - 5
    assert all(-1 <= rho <= 1 for rho in signals["entropy_loss_spearman"].values())
    assert set(signals["pairs"]["aerial+signs"]["0.5"]) == {"aerial", "signs", "avg"}
    assert all(100 / 10 <= share <= 100 for share in signals["top_class_share_ta"].values())
    assert "routed_mlps_entropy" not in signals  # only with routing_steps > 0


def test_signals_cli_refuses_negative_routing_steps_before_loading(tmp_path, capsys):
    from fusion_bench.scripts.mini_clip_signals import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--build", str(tmp_path / "missing"), "--routing-steps", "-1"])
    assert exit_info.value.code == 2
    assert "--routing-steps must be >= 0, not -1" in capsys.readouterr().err


def test_perfect_router_mlp_weights_start_at_the_merge_and_train(tmp_path):
    """The perfect-router signal: at step 0 it is the task-arithmetic merge (every MLP weight 0.3), and a
    few steps on either objective move its weights; measure_signals reports both objectives per task."""
    from fusion_bench.scripts.build_mini_clip_v2 import MiniClipRecipeV2, build_mini_clip_v2
    from fusion_bench.scripts.mini_clip_signals import MiniClipSignals, measure_signals, task_arithmetic

    recipe = MiniClipRecipeV2(**{**SMOKE, "finetune_steps": 3, "pretrain_steps": 3})
    build_mini_clip_v2(tmp_path / "build", recipe, tasks=["aerial", "signs"])
    signals = MiniClipSignals(tmp_path / "build", n_test=24, n_probe=8)
    merged = task_arithmetic(signals.pretrained, signals.experts, 0.3)
    for task in ("aerial", "signs"):
        accuracy, weights = signals.routed_mlps(task, "entropy", 0)
        assert accuracy == signals.accuracy(merged, task)
        assert weights.shape == (recipe.num_layers, 2) and bool((weights == 0.3).all())
    for objective in ("entropy", "labels"):
        _, weights = signals.routed_mlps("signs", objective, 3, batch_size=4)
        assert not bool((weights == 0.3).all())
    with pytest.raises(ValueError, match="objective must be"):
        signals.routed_mlps("signs", "loss", 1)
    result = measure_signals(signals, routing_steps=2)
    for objective in ("entropy", "labels"):
        assert set(result[f"routed_mlps_{objective}"]) == {"aerial", "signs", "avg"}
        assert all(0 <= v <= 100 for v in result[f"routed_mlps_{objective}"].values())


def test_shipped_configs_match_the_domains_and_the_resolver_knows_the_tasks():
    from hydra import compose, initialize_config_dir

    from fusion_bench.data.mini_tasks import mini_path
    from fusion_bench.errors import ConfigError
    from fusion_bench.scripts.cli import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "fusion_bench_config",
            overrides=[
                "taskpool=CLIPVisionModelTaskPool/mini-clip_TA8",
                "modelpool=CLIPVisionModelPool/mini-clip_TA8",
            ],
        )
    assert list(cfg.taskpool.test_datasets) == TASKS == [m for m in cfg.modelpool.models if m != "_pretrained_"]
    for task, entry in cfg.taskpool.test_datasets.items():
        assert list(entry.classnames) == list(DOMAINS[task].classnames), task
        assert list(entry.templates) == list(DOMAINS[task].templates), task
    assert set(cfg.modelpool.train_datasets) == set(TASKS)
    with pytest.raises(ConfigError, match=r"a task among scenes, vehicles, .*textures \(first design: shape, color"):
        mini_path("datasets/nope")
