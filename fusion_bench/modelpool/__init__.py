"""Model pools: named sets of models with their datasets, loaded lazily."""

from fusion_bench.modelpool.base_pool import MODELPOOLS, PRETRAINED, BaseModelPool, register_modelpool
from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool, HuggingFaceClipVisionPool
from fusion_bench.modelpool.clip_vision_lora import CLIPVisionLoRAModelPool
from fusion_bench.modelpool.openclip_vision import OpenCLIPVisionModelPool
from fusion_bench.modelpool.image_classification import HFImageClassificationModelPool

__all__ = [
    "MODELPOOLS",
    "PRETRAINED",
    "BaseModelPool",
    "register_modelpool",
    "CLIPVisionModelPool",
    "HuggingFaceClipVisionPool",
    "CLIPVisionLoRAModelPool",
    "OpenCLIPVisionModelPool",
    "HFImageClassificationModelPool",
]
