"""Task pools: evaluate a model on a set of tasks and return a report."""

from fusion_bench.taskpool.base_pool import TASKPOOLS, BaseTaskPool, register_taskpool
from fusion_bench.taskpool.clip_vision import CLIPVisionModelTaskPool
from fusion_bench.taskpool.dummy import DummyTaskPool
from fusion_bench.taskpool.image_classification import ImageClassificationTaskPool
from fusion_bench.taskpool.openclip_vision import OpenCLIPVisionModelTaskPool

__all__ = [
    "TASKPOOLS",
    "BaseTaskPool",
    "register_taskpool",
    "CLIPVisionModelTaskPool",
    "DummyTaskPool",
    "ImageClassificationTaskPool",
    "OpenCLIPVisionModelTaskPool",
]
