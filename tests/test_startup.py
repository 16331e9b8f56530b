"""Start-up: the registries know every name without importing the modules, and a run imports only what it uses."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

import fusion_bench.method as method_pkg
import fusion_bench.modelpool as modelpool_pkg
import fusion_bench.taskpool as taskpool_pkg
from fusion_bench.errors import UnknownNameError
from fusion_bench.utils.lazy_registry import SourceTable, scan_package
from fusion_bench.utils.registry import Registry

PACKAGES = [
    (method_pkg, method_pkg.ALGORITHMS),
    (modelpool_pkg, modelpool_pkg.MODELPOOLS),
    (taskpool_pkg, taskpool_pkg.TASKPOOLS),
]
HEAVY = ("lightning.pytorch", "lightning", "torchmetrics", "open_clip", "peft", "matplotlib")


@pytest.mark.parametrize(("package", "registry"), PACKAGES, ids=lambda p: getattr(p, "__name__", ""))
def test_source_table_equals_what_the_modules_register(package, registry):
    table = package.source_table()
    package.load_all()
    assert set(table.names) == set(registry._items)  # every registration seen, none invented
    for name, module in table.names.items():
        assert registry.get(name).__module__ == module, name
    for name, module in table.exports.items():  # every public name served by the module listed
        assert getattr(package, name) is getattr(importlib.import_module(module), name)


def test_every_name_in_the_old_public_lists_is_served():
    for name in modelpool_pkg.__all__:
        assert getattr(modelpool_pkg, name) is not None
    for name in taskpool_pkg.__all__:
        assert getattr(taskpool_pkg, name) is not None
    assert method_pkg.TaskArithmeticAlgorithm.name == "task_arithmetic"
    assert {"task_arithmetic", "ties_merging"} <= set(method_pkg.CORES)
    with pytest.raises(AttributeError, match="'fusion_bench.method' has no attribute 'NoSuchThing'"):
        method_pkg.NoSuchThing  # noqa: B018


def test_scanner_reads_literals_constants_and_all(tmp_path):
    pkg = tmp_path / "scanpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text('__all__ = ["A", "helper"]\n\n@register_x("alpha", core=f)\nclass A: ...\n')
    (pkg / "sub" / "b.py").write_text(
        'NAMES = ("beta", "BetaPool")\nNAME = "gamma"\n__all__ = ("B",)\n'
        "register_x(*NAMES)(B)\n@register_x(NAME)\nclass C: ...\n"
    )
    (pkg / "_private.py").write_text('@register_x("hidden")\nclass H: ...\n')
    sys.path.insert(0, str(tmp_path))
    try:
        table = scan_package(importlib.import_module("scanpkg"), "register_x")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("scanpkg", None)
    assert table.names == {
        "alpha": "scanpkg.a",
        "beta": "scanpkg.sub.b",
        "BetaPool": "scanpkg.sub.b",
        "gamma": "scanpkg.sub.b",
    }
    assert table.exports == {"A": "scanpkg.a", "helper": "scanpkg.a", "B": "scanpkg.sub.b"}


def test_registry_falls_back_to_importing_everything_for_an_unlisted_name():
    registry: Registry[object] = Registry("thing")
    loaded = []

    def load_all() -> None:
        loaded.append(True)
        registry.register("late")(int)

    registry.set_lazy(lambda: {}, load_all)
    assert registry.get("late") is int and loaded == [True]
    with pytest.raises(UnknownNameError, match=r"unknown thing 'lat'\. Did you mean 'late'\? Known: late\."):
        registry.get("lat")
    assert SourceTable().names == {}


def _imports_after_cli_run(args: list[str], cwd) -> dict:
    code = (
        "import json, runpy, sys\n"
        f"sys.argv = ['fusion_bench', *{args!r}]\n"
        "try:\n    runpy.run_module('fusion_bench', run_name='__main__')\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_data_free_run_imports_no_trainer_openclip_peft_or_matplotlib(tiny_example, tmp_path):
    args = [
        "method=task_arithmetic",
        "modelpool=CLIPVisionModelPool/tiny-clip_example_model_only",
        "taskpool=dummy",
        f"merged_model_save_path={tmp_path / 'merged'}",
        "report_save_path=false",
    ]
    assert _imports_after_cli_run(args, tmp_path) == []
    assert (tmp_path / "merged").is_dir()  # the run did its work
