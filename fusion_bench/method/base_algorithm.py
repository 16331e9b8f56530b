"""The algorithm interface: ``run(modelpool) -> model``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from fusion_bench.utils.registry import Registry

if TYPE_CHECKING:
    import lightning

    from fusion_bench.modelpool import BaseModelPool
    from fusion_bench.taskpool import BaseTaskPool

__all__ = ["BaseAlgorithm", "ALGORITHMS", "CORES", "register_algorithm"]

ALGORITHMS: Registry["BaseAlgorithm"] = Registry("method")
CORES: dict[str, Callable[..., dict[str, Any]]] = {}  # method name -> its pure core (fusion_bench.merge.cores)


def register_algorithm(name: str, *, core: Callable[..., dict[str, Any]] | None = None) -> Callable[[type], type]:
    """Class decorator: register the algorithm under ``name`` (and its in-memory pure core, if any).

    Args:
        name: the method's name (``method.name=`` and messages).
        core: the state-dict function computing the same merge in memory (decorated with
            :func:`fusion_bench.merge.cores.pure_core`); listed in :data:`CORES`.
    """

    def decorator(cls: type) -> type:
        ALGORITHMS.register(name)(cls)
        cls.name = name  # the one place a method's name is set
        if core is not None:
            CORES[name] = core
        return cls

    return decorator


class BaseAlgorithm:
    """A fusion method.

    Subclasses are registered with :func:`register_algorithm` (which sets :attr:`name`), take their hyperparameters as keyword arguments in ``__init__`` (the
    same names as in their YAML config) and implement :meth:`run`. The program sets
    :attr:`fabric` (a ``lightning.Fabric``) and :attr:`taskpool` (the run's task pool, or None) before
    calling ``run``; methods use it for
    devices instead of calling ``.cuda()``.
    """

    fabric: "lightning.Fabric | None" = None
    taskpool: "BaseTaskPool | None" = None  # the run's task pool, set by the program (None in the Python API)
    name: str = "method"  # set by :func:`register_algorithm` on every registered subclass

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass's ``__init__`` refuses NaN/Inf and non-numbers for numeric options (CLI and
        Python alike) before its own checks run."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_checks_arguments", False):
            cls.__init__ = _checked_init(cls, init)  # type: ignore[method-assign]

    def run(self, modelpool: "BaseModelPool") -> nn.Module:
        """Fuse the models of ``modelpool`` and return the fused model."""
        raise NotImplementedError

    def extra_report(self) -> dict[str, Any]:
        """Extra entries the program adds to the report (e.g. learned weights)."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(
            f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k not in ("fabric", "taskpool")
        )
        return f"{type(self).__name__}({opts})"


def _checked_init(cls: type, init: Any) -> Any:
    import functools

    from fusion_bench.method._options import check_arguments

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if type(self).__init__ is __init__:  # once, by the outermost constructor
            check_arguments(_method_label(type(self)), init, args, kwargs)
        init(self, *args, **kwargs)

    __init__._checks_arguments = True  # type: ignore[attr-defined]
    return __init__


def _method_label(cls: type) -> str:
    return ALGORITHMS.name_of(cls) or cls.__name__
