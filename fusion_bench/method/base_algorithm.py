"""The algorithm interface: ``run(modelpool) -> model``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from fusion_bench.utils.registry import Registry

if TYPE_CHECKING:
    import lightning

    from fusion_bench.modelpool import BaseModelPool

__all__ = ["BaseAlgorithm", "ALGORITHMS", "register_algorithm"]

ALGORITHMS: Registry["BaseAlgorithm"] = Registry("method")
register_algorithm = ALGORITHMS.register


class BaseAlgorithm:
    """A fusion method.

    Subclasses take their hyperparameters as keyword arguments in ``__init__`` (the
    same names as in their YAML config) and implement :meth:`run`. The program sets
    :attr:`fabric` (a ``lightning.Fabric``) before calling ``run``; methods use it for
    devices instead of calling ``.cuda()``.
    """

    fabric: "lightning.Fabric | None" = None

    def run(self, modelpool: "BaseModelPool") -> nn.Module:
        """Fuse the models of ``modelpool`` and return the fused model."""
        raise NotImplementedError

    def extra_report(self) -> dict[str, Any]:
        """Extra entries the program adds to the report (e.g. learned weights)."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "fabric")
        return f"{type(self).__name__}({opts})"
