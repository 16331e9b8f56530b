"""clip_multitask_finetune (traditional MTL): balanced batches, mean of per-task losses, variants, errors, CLI."""

from __future__ import annotations

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from fusion_bench.data.task_text import task_classnames_and_templates
from fusion_bench.errors import ConfigError
from fusion_bench.method.train.clip_multitask_finetune import CLIPMultiTaskFinetuneAlgorithm, MultiTaskHeadClassifier
from fusion_bench.modelpool import CLIPVisionModelPool
from fusion_bench.models.hf_clip import vision_state_dict

SVHN_WIDER = [str(i) for i in range(10)] + ["eleven", "twelve"]  # a 12-class head: the padding is exercised
SVHN_TEMPLATES = ["a photo of the number: {}.", "the digit {}."]


def _pool(example) -> CLIPVisionModelPool:
    train = {t: {"path": str(p), "split": "train"} for t, p in example.datasets.items()}
    return CLIPVisionModelPool({"_pretrained_": str(example.base_model)}, train_datasets=train)


def _head(clip: CLIPModel, tokenizer, classnames: list[str], templates: list[str]) -> torch.Tensor:
    """The zero-shot head computed here, independently: mean of normalised prompt embeddings, re-normalised."""
    rows = []
    with torch.no_grad():
        for name in classnames:
            tokens = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
            emb = F.normalize(clip.text_projection(clip.text_model(**tokens).pooler_output), dim=-1)
            rows.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(rows)


def test_mtl_equals_adam_on_the_mean_of_the_per_task_losses(tiny_example):
    """Batches of a whole train split (40 images) per task: every step sees all images of every task, so the
    run equals Adam on mean_t CE_t(all images of t) computed here task by task (no padding, no batching)."""
    pool = _pool(tiny_example)
    method = CLIPMultiTaskFinetuneAlgorithm(
        learning_rate=1e-3,
        num_steps=2,
        batch_size=40,
        seed=0,
        classnames={"svhn": SVHN_WIDER},
        templates={"svhn": SVHN_TEMPLATES},
    )
    model = method.run(pool)
    report = method.extra_report()["clip_multitask_finetune"]
    assert report["tasks"] == ["mnist", "eurosat", "svhn"] and report["batch_size_per_task"] == 40

    clip = CLIPModel.from_pretrained(str(tiny_example.base_model)).eval().requires_grad_(False)
    processor = pool.load_processor()
    vision = pool.load_pretrained_model().train()
    data = {}
    for task, path in tiny_example.datasets.items():
        rows = datasets.load_from_disk(str(path))["train"]
        pixels = processor.image_processor(images=[r["image"].convert("RGB") for r in rows], return_tensors="pt")[
            "pixel_values"
        ]
        names, templates = task_classnames_and_templates(
            task, *((SVHN_WIDER, SVHN_TEMPLATES) if task == "svhn" else (None, None))
        )
        data[task] = (pixels, torch.tensor(rows["label"]), _head(clip, processor.tokenizer, names, templates))
    assert data["svhn"][2].shape[0] == 12
    optimizer = torch.optim.Adam(vision.parameters(), lr=1e-3, weight_decay=0.0)
    scale = clip.logit_scale.exp()
    for _ in range(2):
        losses = []
        for pixels, labels, head in data.values():
            embeds = F.normalize(clip.visual_projection(vision(pixel_values=pixels).pooler_output), dim=-1)
            losses.append(F.cross_entropy(scale * embeds @ head.T, labels))
        optimizer.zero_grad()
        torch.stack(losses).mean().backward()
        optimizer.step()
    expected = vision_state_dict(vision)
    got = vision_state_dict(model)
    assert set(got) == set(expected)
    for key in expected:
        if key.endswith("k_proj.bias"):  # its true gradient is 0 (softmax ignores a shift shared by all keys):
            continue  # Adam's g / sqrt(v) turns float noise into steps of size lr, differently in each computation
        assert torch.allclose(got[key], expected[key], atol=2e-6), key
    assert any(not torch.equal(expected[k], v) for k, v in vision_state_dict(pool.load_pretrained_model()).items())


def test_balanced_batches_and_padded_heads(tiny_example):
    """Each step holds batch_size images of every task, in task order; a row's softmax is its own task's."""
    pool = _pool(tiny_example)
    method = CLIPMultiTaskFinetuneAlgorithm(
        num_steps=1, batch_size=4, seed=0, classnames={"svhn": SVHN_WIDER}, templates={"svhn": SVHN_TEMPLATES}
    )
    label, classifier, loaders = method._setup(pool)
    assert label == "mnist, eurosat, svhn" and [len(next(iter(loader))[1]) for loader in loaders] == [4, 4, 4]
    pixels, labels = next(method._batches(loaders))
    assert pixels.shape[0] == 12 and labels.shape == (12,)
    with torch.no_grad():
        logits = classifier(pixels)
    assert logits.shape == (12, 12)
    assert torch.isinf(logits[:8, 10:]).all() and torch.isfinite(logits[8:]).all()
    for t in range(3):  # the same as each task's own zero-shot classifier
        single = torch.nn.functional.log_softmax(logits[4 * t : 4 * t + 4, : classifier.num_classes[t]], dim=-1)
        assert torch.allclose(
            torch.log_softmax(logits[4 * t : 4 * t + 4], dim=-1)[:, : classifier.num_classes[t]], single, atol=1e-6
        )
    with pytest.raises(ValueError, match="a batch holds 4 images of each of 3 tasks; got 5"):
        classifier(pixels[:5])
    assert isinstance(classifier, MultiTaskHeadClassifier)


@pytest.mark.parametrize("variant", ["lora", "l_lora"])
def test_mtl_lora_variants_train_only_the_adapters(tiny_example, tmp_path, variant):
    pool = _pool(tiny_example)
    method = CLIPMultiTaskFinetuneAlgorithm(
        learning_rate=3e-2,
        num_steps=3,
        batch_size=8,
        seed=0,
        save_path=str(tmp_path / "ad"),
        use_lora=variant == "lora",
        use_l_lora=variant == "l_lora",
        lora_config={"r": 4, "lora_alpha": 8},
    )
    folded = method.run(pool)
    report = method.extra_report()["clip_multitask_finetune"]
    assert report["variant"] == variant and report["trainable_params"] == 2 * 2 * (4 * 32 + 32 * 4)
    base, out = vision_state_dict(pool.load_pretrained_model()), vision_state_dict(folded)
    moved = {k for k in base if not torch.equal(base[k], out[k])}
    assert moved and all(k.split(".")[-2] in ("q_proj", "v_proj") for k in moved)
    assert (tmp_path / "ad" / "adapter_config.json").is_file()


def test_mtl_options_are_checked(tiny_example):
    with pytest.raises(
        ConfigError, match=r"clip_multitask_finetune: option 'task' is clip_finetune's; choose the tasks with 'tasks'"
    ):
        CLIPMultiTaskFinetuneAlgorithm(task="mnist")
    with pytest.raises(
        ConfigError,
        match=r"clip_multitask_finetune: unknown option\(s\) 'scaling_factor'; valid options: tasks, clip_model",
    ):
        CLIPMultiTaskFinetuneAlgorithm(scaling_factor=0.3)
    with pytest.raises(ConfigError, match=r"option 'tasks' must be a non-empty list"):
        CLIPMultiTaskFinetuneAlgorithm(tasks="mnist")
    with pytest.raises(ConfigError, match=r"option 'classnames' must map task -> list"):
        CLIPMultiTaskFinetuneAlgorithm(classnames=["a", "b"])
    with pytest.raises(
        ConfigError, match=r"the pool's train datasets are \['mnist', 'eurosat', 'svhn'\]; not among them: \['cars'\]"
    ):
        CLIPMultiTaskFinetuneAlgorithm(tasks=["mnist", "cars"], num_steps=1).run(_pool(tiny_example))
