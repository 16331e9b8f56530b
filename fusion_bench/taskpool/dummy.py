"""``taskpool=dummy``: no evaluation, only the model's parameter counts."""

from __future__ import annotations

from typing import Any

from torch import nn

from fusion_bench.taskpool.base_pool import BaseTaskPool, register_taskpool
from fusion_bench.utils.model_info import model_info

__all__ = ["DummyTaskPool"]


@register_taskpool("dummy")
class DummyTaskPool(BaseTaskPool):
    """Report ``{'model_info': {trainable_params, all_params, trainable_percentage}}``."""

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        return {"model_info": model_info(model)}
