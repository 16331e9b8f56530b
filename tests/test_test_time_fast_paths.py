"""Fast paths give what the plain ones give, bit for bit: the collate's grouped preprocessing (vs the
processor's own per-image default), test-time batch streams that decode and preprocess each image once,
and the merged model's parameter swap (vs ``torch.func.functional_call``)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torch import nn
from torch.func import functional_call
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from fusion_bench.data.loading import ImageClassificationCollate
from fusion_bench.method.test_time.clip_heads import CachedBatchStream, SeededBatchStream
from fusion_bench.models.functional_merge import FunctionalMergedModel


class CountingRows(torch.utils.data.Dataset):
    """A map-style dataset of varied-size RGB/grayscale PIL images that counts the rows read."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.rows = []
        for i in range(n):
            h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
            mode = "L" if i % 3 == 0 else "RGB"
            shape = (h, w) if mode == "L" else (h, w, 3)
            self.rows.append({"image": Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode), "label": i})
        self.reads = 0

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        self.reads += 1
        return self.rows[index]


@pytest.fixture(scope="module")
def collate() -> ImageClassificationCollate:
    return ImageClassificationCollate(CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32))


@pytest.mark.parametrize("size", [32, 224])
def test_collate_preprocesses_like_the_processor_image_by_image(size):
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size=size)
    rng = np.random.default_rng(1)
    varied = [r["image"] for r in CountingRows(12).rows]
    same = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(5)]
    rows = [{"image": image, "label": i} for i, image in enumerate(varied + same)]
    collate = ImageClassificationCollate(processor)
    assert collate.processor_kwargs == {"disable_grouping": False}
    pixels, labels = collate(rows)
    expected = processor(images=[r["image"].convert("RGB") for r in rows], return_tensors="pt")["pixel_values"]
    assert pixels.dtype == expected.dtype and torch.equal(pixels, expected)
    assert labels.tolist() == list(range(len(rows)))


def test_collate_passes_no_extra_option_to_a_plain_callable():
    seen = {}

    def processor(images, return_tensors, **kwargs):
        seen.update(kwargs)
        return {"pixel_values": torch.zeros(len(images), 3, 2, 2)}

    pixels, _ = ImageClassificationCollate(processor)([{"image": Image.new("L", (3, 3)), "label": 0}])
    assert pixels.shape == (1, 3, 2, 2) and seen == {}


def loader_batches(dataset, collate, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    sampler = SeededBatchStream(len(dataset), 4, seed=3)
    stream = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate))
    return [next(stream) for _ in range(steps)]


def test_cached_stream_gives_the_loaders_batches_and_reads_each_row_once(collate):
    dataset = CountingRows(10)
    expected = loader_batches(dataset, collate, 12)  # 3 batches per epoch: 4 epochs
    dataset.reads = 0
    stream = CachedBatchStream(dataset, SeededBatchStream(10, 4, seed=3), collate)
    for pixels, labels in expected:
        got_pixels, got_labels = next(stream)
        assert got_pixels.dtype == pixels.dtype and torch.equal(got_pixels, pixels)
        assert torch.equal(got_labels, labels)
    assert dataset.reads == 10


def test_cached_stream_collates_every_batch_when_the_split_is_too_large(collate):
    dataset = CountingRows(10)
    expected = loader_batches(dataset, collate, 6)
    dataset.reads = 0
    stream = CachedBatchStream(dataset, SeededBatchStream(10, 4, seed=3), collate, max_bytes=1000)
    for pixels, labels in expected:
        got_pixels, got_labels = next(stream)
        assert torch.equal(got_pixels, pixels) and torch.equal(got_labels, labels)
    assert dataset.reads == 6 * 4 - 2 * 2  # every draw read (two short batches of 2)


def test_cached_stream_reads_hugging_face_datasets_in_batches(collate):
    images = CountingRows(9).rows
    dataset = datasets.Dataset.from_dict(
        {"image": [r["image"].convert("RGB") for r in images], "label": [r["label"] for r in images]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    expected = loader_batches(dataset, collate, 7)
    stream = CachedBatchStream(dataset, SeededBatchStream(9, 4, seed=3), collate)
    for pixels, labels in expected:
        got_pixels, got_labels = next(stream)
        assert torch.equal(got_pixels, pixels) and torch.equal(got_labels, labels)


# ---- FunctionalMergedModel vs functional_call -------------------------------------------------------------
def test_merged_model_runs_like_functional_call_and_restores_the_skeleton():
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4
    )
    skeleton = CLIPVisionModel(config).eval()
    own = {n: p for n, p in skeleton.named_parameters()}
    params = {n: (p.detach() + 0.1 * torch.randn_like(p)).requires_grad_(True) for n, p in own.items()}
    pixels = torch.randn(3, 3, 8, 8)

    expected = functional_call(skeleton, params, (pixels,), strict=False).pooler_output
    expected_grads = torch.autograd.grad(expected.square().sum(), list(params.values()))
    model = FunctionalMergedModel(skeleton).use(params)
    got = model(pixels).pooler_output
    grads = torch.autograd.grad(got.square().sum(), list(params.values()))
    assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    assert all(p is own[n] for n, p in skeleton.named_parameters())  # the skeleton's own are back


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self.b.weight = self.a.weight
        self.register_buffer("offset", torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.offset


def test_merged_model_gives_a_tied_parameter_to_every_name_and_passes_buffers_to_functional_call():
    torch.manual_seed(0)
    skeleton, x = Tied(), torch.randn(4, 2)
    weight = torch.randn(2, 2)
    model = FunctionalMergedModel(skeleton)
    assert torch.equal(model.use({"a.weight": weight})(x), functional_call(skeleton, {"a.weight": weight}, (x,)))
    assert torch.equal(model.use({"b.weight": weight})(x), functional_call(skeleton, {"a.weight": weight}, (x,)))
    with_buffer = {"a.weight": weight, "offset": torch.zeros(2)}
    assert torch.equal(model.use(with_buffer)(x), functional_call(skeleton, with_buffer, (x,)))
    assert skeleton.a.weight is skeleton.b.weight and isinstance(skeleton.a.weight, nn.Parameter)
    assert torch.equal(skeleton.offset, torch.ones(2))
