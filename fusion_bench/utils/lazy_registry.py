"""What a package's modules register and export, read from their source without importing them.

The method, model-pool and task-pool packages hold one module per component; importing every
one of them at start-up would pull Lightning's trainer, open_clip, peft... for a run that needs
none of them. Instead each package reads its modules' source once (a few milliseconds) and
builds a :class:`SourceTable`: registered name -> module and public name (``__all__``) ->
module. The registry imports the one module a run names, and the package's module
``__getattr__`` imports the one module a ``fusion_bench.method.<Name>`` access needs.

What the table can see: ``@register_x("name", ...)`` and ``register_x("name")(cls)`` with
string literals or module-level constants (``NAME = "name"``, ``NAMES = ("a", "b")``, also
passed as ``*NAMES``), and a literal ``__all__`` list or tuple. A registration written any other
way is still found: a name missing from the table makes the registry import every module
(``load_all``) before it reports the name unknown. A test checks that the table equals what the
modules register once imported, so the fallback stays a safety net.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

__all__ = ["SourceTable", "scan_package", "module_names", "import_all", "lazy_attribute"]

_QUOTED = re.compile(r"""["']([^"'\\]+)["']""")
_ALL = re.compile(r"^__all__\s*(?::[^=]*)?=\s*[\[(](.*?)[\])]", re.S | re.M)


@dataclass(frozen=True)
class SourceTable:
    """``names``: registered name -> module; ``exports``: public name -> module (dotted paths)."""

    names: dict[str, str] = field(default_factory=dict)
    exports: dict[str, str] = field(default_factory=dict)


def module_names(package: ModuleType, *, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, Path]]:
    """``(dotted module name, file)`` of every module under ``package``, sorted, without importing them.

    Modules whose last part starts with ``_`` (``__init__`` included) or is in ``skip`` are left out;
    sub-packages are walked.
    """
    for root in package.__path__:
        base = Path(root)
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            if any(p.startswith("_") for p in parts[:-1]) or "__pycache__" in parts:
                continue
            if parts[-1].startswith("_") or parts[-1] in skip:
                continue
            yield ".".join((package.__name__, *parts)), path


def _constant_strings(source: str, identifier: str) -> list[str]:
    """The string literals assigned to the module-level ``identifier`` (``X = "a"`` or ``X = ("a", "b")``)."""
    match = re.search(rf"^{re.escape(identifier)}\s*(?::[^=]*)?=\s*(.+)$", source, re.M)
    return _QUOTED.findall(match.group(1)) if match else []


def _registered_names(source: str, decorator: str) -> list[str]:
    """The names passed to ``decorator(...)`` calls in ``source`` (keyword arguments ignored)."""
    names: list[str] = []
    for call in re.finditer(rf"(?<![\w.]){re.escape(decorator)}\(([^()]*)\)", source):
        for arg in call.group(1).split(","):
            arg = arg.strip()
            if not arg or "=" in arg:
                continue
            literal = _QUOTED.fullmatch(arg)
            if literal:
                names.append(literal.group(1))
            elif re.fullmatch(r"\*?[A-Za-z_]\w*", arg):
                names += _constant_strings(source, arg.lstrip("*"))
    return names


def scan_package(package: ModuleType, decorator: str, *, skip: frozenset[str] = frozenset()) -> SourceTable:
    """Read every module of ``package`` (see :func:`module_names`) and tabulate what it registers/exports."""
    table = SourceTable()
    for module, path in module_names(package, skip=skip):
        source = path.read_text(encoding="utf-8")
        for name in _registered_names(source, decorator):
            table.names.setdefault(name, module)
        exported = _ALL.search(source)
        for name in _QUOTED.findall(exported.group(1)) if exported else ():
            table.exports.setdefault(name, module)
    return table


def import_all(package: ModuleType, *, skip: frozenset[str] = frozenset()) -> None:
    """Import every module of ``package`` (what start-up did before the tables)."""
    for module, _ in module_names(package, skip=skip):
        importlib.import_module(module)


def lazy_attribute(package_name: str, table: Callable[[], SourceTable]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``table().exports`` by importing the one module that defines the name."""

    def __getattr__(name: str) -> Any:
        module = table().exports.get(name)
        if module is None:
            raise AttributeError(f"module {package_name!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return __getattr__
