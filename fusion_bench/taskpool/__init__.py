"""Task pools: evaluate a model on a set of tasks and return a report.

Each task-pool module is imported when a config first names its pool (``type:`` or ``_target_``)
or when ``fusion_bench.taskpool.<Name>`` is first read (see :mod:`fusion_bench.utils.lazy_registry`).
"""

import functools
import sys
from typing import Any

from fusion_bench.taskpool.base_pool import TASKPOOLS, BaseTaskPool, register_taskpool
from fusion_bench.utils.lazy_registry import SourceTable, import_all, lazy_attribute, scan_package

__all__ = [
    "TASKPOOLS",
    "BaseTaskPool",
    "register_taskpool",
    "CLIPVisionModelTaskPool",
    "DummyTaskPool",
    "ImageClassificationTaskPool",
    "OpenCLIPVisionModelTaskPool",
]

_SKIP = frozenset({"base_pool"})


@functools.cache
def source_table() -> SourceTable:
    """Registered task-pool type -> module and public name -> module, read from the sources."""
    return scan_package(sys.modules[__name__], "register_taskpool", skip=_SKIP)


def load_all() -> None:
    """Import every task-pool module."""
    import_all(sys.modules[__name__], skip=_SKIP)


TASKPOOLS.set_lazy(lambda: source_table().names, load_all)
_export = lazy_attribute(__name__, source_table)


def __getattr__(name: str) -> Any:
    return _export(name)


def __dir__() -> list[str]:
    return sorted({*globals(), *source_table().exports})
