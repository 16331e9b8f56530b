"""The positioned-read safetensors reader: bitwise equal to safetensors' own loader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusion_bench.errors import ModelLoadError
from fusion_bench.modelpool.lazy_tensors import SafetensorsSource, safetensors_files_in


def identity(keys: list[str]) -> dict[str, str]:
    return {k: k for k in keys}


def test_reads_every_dtype_bitwise(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2, generator=gen).to(torch.float16),
        "i64": torch.arange(6).reshape(2, 3),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor([True, False]),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    source = SafetensorsSource([tmp_path / "model.safetensors"], rename=identity, what="m")
    reference = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(source.keys()) == sorted(tensors)
    for key, tensor in reference.items():
        got = source.get(key)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), key
        assert source.shape_dtype(key) == (tuple(tensor.shape), tensor.dtype)


def test_sharded_checkpoint(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    files = safetensors_files_in(tmp_path)
    source = SafetensorsSource(files, rename=identity, what="m")
    assert torch.equal(source.get("a"), torch.ones(2)) and torch.equal(source.get("b"), torch.zeros(3))


def test_truncated_and_garbage_files_are_named(tmp_path):
    save_file({"w": torch.randn(100)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-40])
    source = SafetensorsSource([tmp_path / "cut.safetensors"], rename=identity, what="model 'x'")
    with pytest.raises(ModelLoadError, match=r"model 'x': file .*cut.safetensors' is truncated at tensor 'w'"):
        source.get("w")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ModelLoadError, match=r"model 'x': cannot read safetensors file .*junk.safetensors"):
        SafetensorsSource([tmp_path / "junk.safetensors"], rename=identity, what="model 'x'")
    with pytest.raises(ModelLoadError, match=r"model 'x': no tensor 'nope'"):
        source.get("nope")
