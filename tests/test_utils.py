"""Atomic writes and the registry."""

from __future__ import annotations

import json

import pytest

from fusion_bench.errors import UnknownNameError
from fusion_bench.utils.io import atomic_directory, atomic_write, atomic_write_json
from fusion_bench.utils.registry import Registry


def test_atomic_write_json_replaces_whole_file(tmp_path):
    path = atomic_write_json(tmp_path / "a" / "r.json", {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_atomic_write_failure_leaves_target_untouched(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_atomic_directory(tmp_path):
    with atomic_directory(tmp_path / "d") as d:
        (d / "f").write_text("1")
    assert (tmp_path / "d" / "f").read_text() == "1"
    with pytest.raises(ValueError):
        with atomic_directory(tmp_path / "d") as d:
            (d / "g").write_text("2")
            raise ValueError
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["f"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_registry_lists_known_names():
    reg: Registry[object] = Registry("widget")

    @reg.register("alpha", "a")
    class Alpha:
        pass

    assert reg.get("a") is Alpha and "alpha" in reg and reg.names() == ["a", "alpha"]
    with pytest.raises(UnknownNameError, match=r"^unknown widget 'alpah'. Did you mean 'alpha'\? Known: a, alpha.$"):
        reg.get("alpah")
    with pytest.raises(RuntimeError, match="registered twice"):
        reg.register("a")(type("Other", (), {}))


def test_checkpoint_round_trip_restores_rng_and_refuses_other_pools(tmp_path):
    import random

    import numpy as np
    import torch

    from fusion_bench.errors import ConfigError, ModelLoadError
    from fusion_bench.utils.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

    state = rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
    path = save_checkpoint(tmp_path / "c.pt", {"step": 7, "rng": state, "w": torch.arange(3.0)}, meta={"models": ["a", "b"]})
    loaded = load_checkpoint(path, expect={"models": ["a", "b"]})
    set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), torch.rand(3).tolist()) == first
    assert loaded["step"] == 7 and loaded["w"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(ConfigError, match=r"was made for models \['a', 'b'\], not \['a'\]"):
        load_checkpoint(path, expect={"models": ["a"]})
    with pytest.raises(ModelLoadError, match=r"no file"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"is not a FusionBench checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt", "c.pt"]  # no temporary leftovers


def test_entropy_loss_matches_the_formula():
    import torch

    from fusion_bench.method.test_time.clip_heads import entropy_loss

    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    p = torch.softmax(logits, dim=-1)
    expected = (-(p * torch.log(p + 1e-8)).sum(-1)).mean()
    assert torch.allclose(entropy_loss(logits), expected)
    assert abs(entropy_loss(torch.zeros(1, 4)).item() - float(torch.log(torch.tensor(4.0)))) < 1e-6
