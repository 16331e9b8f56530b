"""Pieces shared by the training tasks: the run configuration."""

from fusion_bench.tasks.common.base_module import OPTIMIZERS, SCHEDULERS, BaseConfig, config_from_mapping

__all__ = ["BaseConfig", "OPTIMIZERS", "SCHEDULERS", "config_from_mapping"]
