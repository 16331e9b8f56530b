"""Name -> class registries, filled where each class is defined.

A class registers itself with a decorator in its own module::

    @register_algorithm("task_arithmetic")
    class TaskArithmeticAlgorithm(BaseAlgorithm): ...

Configs may then name it either through Hydra's ``_target_`` or through the
legacy ``name:`` (methods) / ``type:`` (pools) keys. An unknown name raises
:class:`~fusion_bench.errors.UnknownNameError` listing the known ones.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from fusion_bench.errors import UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to classes of one kind (``kind`` is used in messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, type[T]] = {}

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
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, self._items, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._items))}."

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
