"""The program's Lightning Fabric, imported without Lightning's trainer or torchmetrics.

``import lightning`` imports ``lightning.pytorch`` (the trainer) and, through
``lightning.fabric.utilities.imports``, all of torchmetrics (which imports torchvision and
transformers) only to read torchmetrics' version: about 3 s of every run. The program uses the
standalone ``lightning_fabric`` package (the same code, shipped with ``lightning``) and imports
it with torchmetrics' version already known: while ``lightning_fabric`` is imported,
``sys.modules["torchmetrics"]`` holds a module carrying only ``__version__`` (read from the
installed package's metadata), so Lightning's version check reads it instead of importing
torchmetrics; the placeholder is removed right after, so a later ``import torchmetrics`` gets
the real package. (Lightning's version flag is then exactly what it would have computed.)
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import types
from typing import Any

__all__ = ["import_lightning_fabric", "subprocess_launcher_types", "seed_everything"]

_PLACEHOLDER = "torchmetrics"


def import_lightning_fabric() -> types.ModuleType:
    """``lightning_fabric``, imported without importing torchmetrics (see the module docstring)."""
    if "lightning_fabric" in sys.modules or _PLACEHOLDER in sys.modules:
        return importlib.import_module("lightning_fabric")
    try:
        version = importlib.metadata.version(_PLACEHOLDER)
    except importlib.metadata.PackageNotFoundError:  # Lightning then takes it as absent, as it would
        return importlib.import_module("lightning_fabric")
    placeholder = types.ModuleType(_PLACEHOLDER, "version placeholder while lightning_fabric is imported")
    placeholder.__version__ = version  # type: ignore[attr-defined]
    sys.modules[_PLACEHOLDER] = placeholder
    try:
        return importlib.import_module("lightning_fabric")
    finally:
        if sys.modules.get(_PLACEHOLDER) is placeholder:
            del sys.modules[_PLACEHOLDER]


def subprocess_launcher_types() -> tuple[type, ...]:
    """Lightning's command-line re-running launcher class, from each Fabric package loaded
    (``lightning_fabric`` always; ``lightning.fabric`` too when a caller imported ``lightning``)."""
    import_lightning_fabric()
    modules = ["lightning_fabric.strategies.launchers.subprocess_script"]
    if "lightning.fabric" in sys.modules:
        modules.append("lightning.fabric.strategies.launchers.subprocess_script")
    return tuple(importlib.import_module(m)._SubprocessScriptLauncher for m in modules)


def seed_everything(seed: int) -> Any:
    """Lightning's ``seed_everything(seed, workers=True)`` (Python, NumPy and torch generators), quietly."""
    import_lightning_fabric()
    from lightning_fabric.utilities.seed import seed_everything as seed_all

    return seed_all(seed, workers=True, verbose=False)
