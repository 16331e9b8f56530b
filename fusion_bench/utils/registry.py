"""Name -> class registries, filled where each class is defined.

A class registers itself with a decorator in its own module::

    @register_algorithm("task_arithmetic")
    class TaskArithmeticAlgorithm(BaseAlgorithm): ...

Configs may then name it either through Hydra's ``_target_`` or through the
legacy ``name:`` (methods) / ``type:`` (pools) keys. An unknown name raises
:class:`~fusion_bench.errors.UnknownNameError` listing the known ones.

A package may make its registry lazy (:meth:`Registry.set_lazy`): the module registering a name
is imported when the name is first looked up (see :mod:`fusion_bench.utils.lazy_registry`).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterator, Mapping, TypeVar

from fusion_bench.errors import UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to classes of one kind (``kind`` is used in messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type[T]] = {}
        self._table: Callable[[], Mapping[str, str]] = dict
        self._load_all: Callable[[], None] = _nothing

    def set_lazy(self, table: Callable[[], Mapping[str, str]], load_all: Callable[[], None]) -> None:
        """Let names be registered on first use: ``table()`` maps a name to the module registering it
        (imported by :meth:`get`); ``load_all()`` imports every module (for a name the table lacks)."""
        self._table = table
        self._load_all = load_all

    def _find(self, name: str) -> bool:
        """Whether ``name`` is registered, importing its module (or, if unlisted, every module) as needed."""
        if name in self._items:
            return True
        module = self._table().get(name)
        if module is not None:
            importlib.import_module(module)
            if name in self._items:
                return True
        self._load_all()
        return name in self._items

    def register(self, *names: str) -> Callable[[type[T]], type[T]]:
        """Class decorator registering the class under each of ``names``."""

        def decorator(cls: type[T]) -> type[T]:
            for name in names:
                known = self._items.get(name)
                if known is not None and known is not cls:
                    raise RuntimeError(f"{self.kind} name {name!r} registered twice: {known} and {cls}")
                self._items[name] = cls
            return cls

        return decorator

    def get(self, name: str) -> type[T]:
        """Return the class registered under ``name``.

        Raises:
            UnknownNameError: ``name`` is unknown; the message lists the known names.
        """
        if not self._find(name):
            raise UnknownNameError(self.unknown_message(name))
        return self._items[name]

    def unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(known)}."

    def name_of(self, cls: type) -> str | None:
        """The first name (sorted) ``cls`` is registered under, or None."""
        return next((n for n in sorted(self._items) if self._items[n] is cls), None)

    def names(self) -> list[str]:
        """Every known name (registered, or listed in the lazy table), sorted, importing nothing."""
        return sorted(set(self._items) | set(self._table()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and (name in self._items or name in self._table() or self._find(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _nothing() -> None:
    return None
