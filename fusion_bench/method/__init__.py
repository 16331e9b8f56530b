"""Fusion methods: one sub-package per family, one module per algorithm, each registering itself by name.

Layout: ``averaging/``, ``task_vector/`` (family ``core`` + task arithmetic, TIES, DARE, Model
Breadcrumbs, consensus, PCB, LiNeS), ``subspace/`` (TSV-M, Iso-C/CTS, WUDI, Model Stock),
``data/`` (Fisher, RegMean, RegMean++, PWE-MoE), ``test_time/`` (AdaMerging, Concrete, WEMoE, RankOne-MoE, Surgery),
``continual/`` (OPCM and the sequential baselines), ``upscaling/`` (SMILE), ``ensemble/`` (output
ensembles), ``train/`` (fine-tuning), ``analysis/``, and ``dummy``.

Nothing is imported up front: the registry (:data:`ALGORITHMS`) knows which module registers
each name by reading the modules' source (:mod:`fusion_bench.utils.lazy_registry`), so a run
imports only the method it runs. The public names (``__all__``) of every member module are
available as ``fusion_bench.method.<Name>``, each importing its own module on first access;
:data:`CORES` imports every module first, so it lists every method's pure core. Adding a method
means adding one module (with ``@register_algorithm``) and its YAML to its family; no list to
keep in sync.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from fusion_bench.method.base_algorithm import (
    ALGORITHMS,
    BaseAlgorithm as BaseAlgorithm,
    register_algorithm as register_algorithm,
)
from fusion_bench.utils.lazy_registry import SourceTable, import_all, lazy_attribute, scan_package

BASE_NAMES = ["ALGORITHMS", "CORES", "BaseAlgorithm", "register_algorithm", "load_all"]

FRAMEWORK_MODULES = frozenset({"base_algorithm", "base", "core", "clip_heads", "svd"})  # imported, not re-exported


@functools.cache
def source_table() -> SourceTable:
    """Registered method name -> module and public name -> module, read from the sources."""
    return scan_package(sys.modules[__name__], "register_algorithm", skip=FRAMEWORK_MODULES)


def load_all() -> None:
    """Import every method module (so every method is registered and every core listed)."""
    import_all(sys.modules[__name__], skip=FRAMEWORK_MODULES)


ALGORITHMS.set_lazy(lambda: source_table().names, load_all)
_export = lazy_attribute(__name__, source_table)


def __getattr__(name: str) -> Any:
    if name == "CORES":
        from fusion_bench.method.base_algorithm import CORES

        load_all()
        return CORES
    if name == "__all__":
        return [*BASE_NAMES, *source_table().exports]
    return _export(name)


def __dir__() -> list[str]:
    return sorted({*globals(), *BASE_NAMES, *source_table().exports})
