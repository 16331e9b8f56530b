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
