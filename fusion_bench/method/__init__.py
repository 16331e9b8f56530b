"""Fusion methods: one module per algorithm, each registering itself by name.

Every module of this package is imported here, so each algorithm's ``@register_algorithm``
runs and its public names (``__all__``) are available as ``fusion_bench.method.<Name>``.
Adding a method means adding one module (and its YAML); no list to keep in sync.
"""

from __future__ import annotations

import importlib
import pkgutil

from fusion_bench.method.base_algorithm import ALGORITHMS, BaseAlgorithm, register_algorithm

__all__ = ["ALGORITHMS", "BaseAlgorithm", "register_algorithm"]


def _import_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "base_algorithm":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for name in getattr(module, "__all__", ()):
            globals()[name] = getattr(module, name)
            __all__.append(name)


_import_all()
