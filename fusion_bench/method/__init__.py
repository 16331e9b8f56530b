"""Fusion methods: one sub-package per family, one module per algorithm, each registering itself by name.

Layout: ``averaging/``, ``task_vector/`` (family ``core`` + task arithmetic, TIES, DARE, Model
Breadcrumbs, consensus, PCB, LiNeS), ``subspace/`` (TSV-M, Iso-C/CTS, WUDI, Model Stock),
``data/`` (Fisher, RegMean, RegMean++), ``test_time/`` (AdaMerging, Concrete, WEMoE, Surgery),
``continual/`` (OPCM and the sequential baselines), ``upscaling/`` (SMILE), ``train/`` (fine-tuning),
``analysis/``, and ``dummy``. Every module is imported here, so each
algorithm's ``@register_algorithm`` runs and the public names (``__all__``) of every member
module are available as ``fusion_bench.method.<Name>``. Adding a method means adding one module
(and its YAML) to its family; no list to keep in sync.
"""

from __future__ import annotations

import importlib
import pkgutil

from fusion_bench.method.base_algorithm import ALGORITHMS, CORES, BaseAlgorithm, register_algorithm

__all__ = ["ALGORITHMS", "CORES", "BaseAlgorithm", "register_algorithm"]


FRAMEWORK_MODULES = frozenset({"base_algorithm", "base", "core", "clip_heads", "svd"})  # imported, not re-exported


def _import_all() -> None:
    for info in sorted(pkgutil.walk_packages(__path__, prefix=f"{__name__}."), key=lambda m: m.name):
        leaf = info.name.rsplit(".", 1)[-1]
        if info.ispkg or leaf.startswith("_") or leaf in FRAMEWORK_MODULES:
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", ()):
            globals()[name] = getattr(module, name)
            __all__.append(name)


_import_all()
