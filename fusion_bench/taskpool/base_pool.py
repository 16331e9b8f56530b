"""The task pool interface: ``evaluate(model) -> report``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from fusion_bench.utils.registry import Registry

if TYPE_CHECKING:
    import lightning

__all__ = ["BaseTaskPool", "TASKPOOLS", "register_taskpool"]

TASKPOOLS: Registry["BaseTaskPool"] = Registry("taskpool")
register_taskpool = TASKPOOLS.register


class BaseTaskPool:
    """Evaluates a model on a set of tasks. The program sets :attr:`fabric` before use."""

    fabric: "lightning.Fabric | None" = None

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Return the report: ``{task: {metric: value}, ..., 'average': {...}}``."""
        raise NotImplementedError
