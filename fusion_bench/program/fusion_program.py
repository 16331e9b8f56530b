"""The program behind the CLI: build pool, method and task pool; run; evaluate; report.

Everything is instantiated (and so validated) before any model is loaded; the report is
printed and, with ``report_save_path``, written atomically as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from omegaconf import DictConfig, OmegaConf

import fusion_bench
from fusion_bench.errors import ConfigError
from fusion_bench.method import ALGORITHMS, BaseAlgorithm
from fusion_bench.modelpool import MODELPOOLS, BaseModelPool
from fusion_bench.taskpool import TASKPOOLS, BaseTaskPool
from fusion_bench.utils.instantiate import instantiate_component
from fusion_bench.utils.io import atomic_write_json
from fusion_bench.utils.model_info import model_info

__all__ = ["FabricModelFusionProgram", "output_path_or_none"]

log = logging.getLogger(__name__)


def output_path_or_none(value: Any, option: str = "report_save_path") -> str | None:
    """An output path option: a path, or null/false/"" for none."""
    if value in (None, False, "", "null", "none", "false", "False"):
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{option} must be a path or false, got {value!r}")
    return value


class FabricModelFusionProgram:
    """Run ``method`` on ``modelpool``, evaluate with ``taskpool``, report.

    Args:
        config: the composed root config (keys: method, modelpool, taskpool, fabric, seed,
            fast_dev_run, print_config, report_save_path).
    """

    def __init__(self, config: DictConfig) -> None:
        self.config = config
        self.report_save_path = output_path_or_none(config.get("report_save_path"))
        self.merged_model_save_path = output_path_or_none(config.get("merged_model_save_path"), "merged_model_save_path")

    def fabric_config(self) -> DictConfig | None:
        """The ``fabric`` config; a method's ``devices`` option (when set) is its ``devices``."""
        cfg = self.config.get("fabric")
        devices = OmegaConf.select(self.config, "method.devices", default=None)
        if cfg is not None and devices is not None:
            cfg = OmegaConf.merge(cfg, {"devices": devices})
        return cfg

    def _build_fabric(self):
        import lightning
        from hydra.utils import instantiate

        cfg = self.fabric_config()
        fabric = instantiate(cfg) if cfg is not None else lightning.Fabric(accelerator="cpu", devices=1)
        fabric.launch()
        return fabric

    def build(self) -> tuple[BaseModelPool, BaseAlgorithm, BaseTaskPool | None]:
        """Instantiate the three components (validating their configs)."""
        cfg = self.config
        modelpool = instantiate_component(cfg.get("modelpool"), MODELPOOLS, key="type", what="modelpool")
        method = instantiate_component(cfg.get("method"), ALGORITHMS, key="name", what="method")
        taskpool = None
        if cfg.get("taskpool") is not None:
            taskpool = instantiate_component(cfg.taskpool, TASKPOOLS, key="type", what="taskpool")
        return modelpool, method, taskpool

    def run(self) -> dict[str, Any]:
        """Run the whole job and return the report."""
        import lightning

        if self.config.get("print_config", False):
            print(OmegaConf.to_yaml(self.config, resolve=False), file=sys.stderr)
        seed = self.config.get("seed")
        if seed is not None:
            lightning.seed_everything(int(seed), workers=True, verbose=False)
        modelpool, method, taskpool = self.build()
        fabric = self._build_fabric()
        method.fabric = fabric
        start = time.perf_counter()
        model = method.run(modelpool)
        fusion_seconds = time.perf_counter() - start
        if self.merged_model_save_path is not None:
            path = modelpool.save_model(model, self.merged_model_save_path, description=self._model_card(method, modelpool))
            log.info("merged model saved to %s", path)
        report: dict[str, Any] = {"model_info": model_info(model)}
        if taskpool is not None:
            taskpool.fabric = fabric
            report.update({k: v for k, v in taskpool.evaluate(model).items() if k != "model_info"})
        report.update(method.extra_report())
        report["meta"] = self._meta(taskpool, fusion_seconds, time.perf_counter() - start)
        print(json.dumps(report, indent=2))
        if self.report_save_path is not None:
            path = atomic_write_json(self.report_save_path, report)
            log.info("report saved to %s", path)
        return report

    def _model_card(self, method: BaseAlgorithm, modelpool: BaseModelPool) -> str:
        models = "\n".join(f"- `{n}`: {modelpool.get_model_config(n)}" for n in modelpool.all_model_names)
        return (
            f"# Merged model\n\nMade with FusionBench {fusion_bench.__version__} by `{method!r}` "
            f"(seed {self.config.get('seed')}) from:\n\n{models}\n\n"
            f"Method config:\n\n```yaml\n{OmegaConf.to_yaml(self.config.method)}```\n"
        )

    def _meta(self, taskpool: BaseTaskPool | None, fusion_seconds: float, total_seconds: float) -> dict[str, Any]:
        import torch
        import transformers

        meta: dict[str, Any] = {
            "fusion_bench_version": fusion_bench.__version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "seed": self.config.get("seed"),
            "fusion_seconds": round(fusion_seconds, 3),
            "total_seconds": round(total_seconds, 3),
        }
        if taskpool is not None and hasattr(taskpool, "evaluation_meta"):
            meta.update(taskpool.evaluation_meta())
        return meta
