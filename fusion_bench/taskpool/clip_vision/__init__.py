"""Evaluation of CLIP vision encoders."""

from fusion_bench.taskpool.clip_vision.taskpool import CLIPVisionModelTaskPool

__all__ = ["CLIPVisionModelTaskPool"]
