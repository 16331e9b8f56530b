"""Atomic writes and the registry."""

from __future__ import annotations

import json
import os

import pytest

from fusion_bench.errors import ConfigError, UnknownNameError
from fusion_bench.utils.io import MARKER, atomic_directory, atomic_write, atomic_write_json, clean_stale_temporaries
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
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [MARKER, "f"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_directory_replaces_only_its_own_files(tmp_path):
    with atomic_directory(tmp_path / "d") as d:
        (d / "old").write_text("1")
        (d / "kept").write_text("1")
    with atomic_directory(tmp_path / "d") as d:
        (d / "kept").write_text("2")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [MARKER, "kept"]  # 'old' was ours: gone
    assert (tmp_path / "d" / "kept").read_text() == "2"
    (tmp_path / "d" / "thesis.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"holds files FusionBench did not write \('thesis.txt'\)"):
        with atomic_directory(tmp_path / "d") as d:
            (d / "kept").write_text("3")
    assert (tmp_path / "d" / "kept").read_text() == "2" and (tmp_path / "d" / "thesis.txt").read_text() == "mine"
    with atomic_directory(tmp_path / "d", overwrite=True) as d:
        (d / "kept").write_text("3")
    assert (tmp_path / "d" / "kept").read_text() == "3" and (tmp_path / "d" / "thesis.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_atomic_directory_never_replaces_a_file(tmp_path):
    (tmp_path / "f").write_text("mine")
    with pytest.raises(ConfigError, match="is an existing file"):
        with atomic_directory(tmp_path / "f") as d:
            (d / "x").write_text("1")
    assert (tmp_path / "f").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_outputs_follow_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "d") as d:
            (d / "f").write_text("1")
        path = atomic_write_json(tmp_path / "r.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "d" / "f").stat().st_mode) == 0o644
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".m.{dead}.abcd.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 10)
    live = tmp_path / f".m.{os.getpid()}.efgh.tmp"  # this (live) process's: kept
    live.mkdir()
    other = tmp_path / f".other.{dead}.abcd.tmp"  # another target's: kept
    other.mkdir()
    assert clean_stale_temporaries(tmp_path / "m") == [stale]
    with atomic_directory(tmp_path / "other") as d:
        (d / "f").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "other"]


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_atomic_write_json_refuses_non_finite_numbers(tmp_path):
    with pytest.raises(ValueError, match=r"report.a.loss is nan"):
        atomic_write_json(tmp_path / "r.json", {"a": {"loss": float("nan")}})
    assert not list(tmp_path.iterdir())


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
    path = save_checkpoint(
        tmp_path / "c.pt", {"step": 7, "rng": state, "w": torch.arange(3.0)}, meta={"models": ["a", "b"]}
    )
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
