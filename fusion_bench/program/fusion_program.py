"""The program behind the CLI: build pool, method and task pool; run; evaluate; report.

Everything is instantiated (and so validated) before any model is loaded; the report is
printed and, with ``report_save_path``, written atomically as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

import fusion_bench
from fusion_bench.errors import ConfigError, FusionBenchError
from fusion_bench.method import ALGORITHMS, BaseAlgorithm
from fusion_bench.modelpool import MODELPOOLS, BaseModelPool
from fusion_bench.program.hydra_job import (
    check_process_launch,
    default_report_path,
    existing_report,
    hydra_job_meta,
    job_command_line,
)
from fusion_bench.taskpool import TASKPOOLS, BaseTaskPool
from fusion_bench.utils.instantiate import instantiate_component
from fusion_bench.program.preflight import check_fabric_options, check_outputs, check_run_options
from fusion_bench.program.summary import print_report
from fusion_bench.utils.io import atomic_write_json, check_finite_json, overwrite_allowed
from fusion_bench.utils.fabric import import_lightning_fabric, seed_everything
from fusion_bench.utils.distributed import end_process_group, launch_environment, started_as_rank_zero, world_size
from fusion_bench.utils.model_info import model_info
from fusion_bench.utils.provenance import HASH_MODES, SAMPLED_HASH, file_fingerprint, package_versions, peak_memory
from fusion_bench.utils.paths import optional_path

# Lightning warns on every run on a machine with SLURM's `srun` (a login node, a machine with SLURM
# installed) when the program is not started by srun; our SLURM launcher starts jobs with sbatch and
# one task per device, which Lightning's SLURM environment picks up without srun.
warnings.filterwarnings("ignore", message="The `srun` command is available on your system but is not used")

__all__ = ["FabricModelFusionProgram", "missing_keys", "output_path_or_none", "ACCURACY_TYPE"]

ACCURACY_TYPE = "absolute"  # top-1 fraction in [0, 1], not normalised by the fine-tuned models' accuracy

log = logging.getLogger(__name__)


class NonFiniteReportError(FusionBenchError, ValueError):
    """The report holds NaN or Inf (a diverged merge or training): it is not written."""


def output_path_or_none(value: Any, option: str = "report_save_path") -> str | None:
    """An output path option: a path, or null/false/"" for none."""
    return optional_path(value, option)


def missing_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """The dotted keys whose value is ``???``, found without resolving any interpolation."""
    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else list(cfg.keys())
    missing = []
    for key in keys:
        name = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            missing.append(name)
        elif not OmegaConf.is_interpolation(cfg, key) and OmegaConf.is_config(cfg[key]):
            missing += missing_keys(cfg[key], f"{name}.")
    return missing


class FabricModelFusionProgram:
    """Run ``method`` on ``modelpool``, evaluate with ``taskpool``, report.

    Args:
        config: the composed root config (keys: method, modelpool, taskpool, fabric, seed,
            fast_dev_run, print_config, report_save_path, skip_existing_report,
            merged_model_save_path, checkpoint_hash, overwrite, print_json).

    Every option, and every output path, is checked here, before any work.
    """

    def __init__(self, config: DictConfig) -> None:
        self.config = config
        check_run_options(config)
        self.report_save_path = default_report_path(config.get("report_save_path"))
        self.merged_model_save_path = output_path_or_none(
            config.get("merged_model_save_path"), "merged_model_save_path"
        )
        self.overwrite = bool(config.get("overwrite", False))
        self.print_json = bool(config.get("print_json", False))
        check_fabric_options(config)
        check_outputs(config, report_path=self.report_save_path, model_path=self.merged_model_save_path)
        self.model: Any = None  # the fused model, once run() has made it
        self.skip_existing_report = config.get("skip_existing_report", False)
        if not isinstance(self.skip_existing_report, bool):
            raise ConfigError(f"skip_existing_report must be true or false, got {self.skip_existing_report!r}")
        self.checkpoint_hash = config.get("checkpoint_hash", "sampled")
        if self.checkpoint_hash not in (*HASH_MODES, False, None):
            raise ConfigError(
                f"checkpoint_hash must be one of {', '.join(HASH_MODES)} or false, got {self.checkpoint_hash!r}"
            )

    def fabric_config(self) -> DictConfig | None:
        """The ``fabric`` config; a method's ``devices`` option (when set) is its ``devices``."""
        cfg = self.config.get("fabric")
        devices = OmegaConf.select(self.config, "method.devices", default=None)
        if cfg is not None and devices is not None:
            cfg = OmegaConf.merge(cfg, {"devices": devices})
        return cfg

    def _build_fabric(self):
        from hydra.utils import instantiate

        lightning_fabric = import_lightning_fabric()
        cfg = self.fabric_config()
        try:
            fabric = instantiate(cfg) if cfg is not None else lightning_fabric.Fabric(accelerator="cpu", devices=1)
        except Exception as err:  # Lightning's own checks (unknown strategy, ...), wrapped by Hydra
            cause = err.__cause__ or err
            first = " ".join((str(cause).strip().splitlines() or [type(cause).__name__])[0].split())
            raise ConfigError(
                f"fabric (strategy={cfg.get('strategy')!r}, accelerator={cfg.get('accelerator')!r}): {first}"
            ) from None
        check_process_launch(fabric)
        with job_command_line():
            fabric.launch()
        return fabric

    def build(self) -> tuple[BaseModelPool, BaseAlgorithm, BaseTaskPool | None]:
        """Instantiate the three components (validating their configs)."""
        cfg = self.config
        missing = missing_keys(cfg) if isinstance(cfg, DictConfig) else []
        if missing:  # '???' in a root config, e.g. corruption
            raise ConfigError(
                f"missing mandatory option(s) {', '.join(map(repr, missing))}; set them, e.g. {missing[0]}=..."
            )
        modelpool = instantiate_component(cfg.get("modelpool"), MODELPOOLS, key="type", what="modelpool")
        method = instantiate_component(cfg.get("method"), ALGORITHMS, key="name", what="method")
        taskpool = None
        if cfg.get("taskpool") is not None:
            taskpool = instantiate_component(cfg.taskpool, TASKPOOLS, key="type", what="taskpool")
        if taskpool is not None and getattr(method, "needs_task_at_inference", False):
            from fusion_bench.models.task_conditioned import check_task_names

            check_task_names(modelpool.model_names, getattr(taskpool, "task_names", []), what=f"method {method.name!r}")
        return modelpool, method, taskpool

    def _skip(self) -> dict[str, Any] | None:
        """The existing report when ``skip_existing_report`` is on and one stands for this run."""
        if not self.skip_existing_report or self.report_save_path is None:
            return None
        report = existing_report(self.report_save_path, fast_dev_run=self.config.get("fast_dev_run", False))
        if report is not None:
            print(
                f"fusion_bench: {self.report_save_path} exists; run skipped (skip_existing_report=true)",
                file=sys.stderr,
            )
        return report

    def run(self) -> dict[str, Any]:
        """Run the whole job and return the report (on every rank; rank 0 prints and writes it)."""
        started = time.perf_counter()
        skipped = self._skip()
        if skipped is not None:
            return skipped
        if self.config.get("print_config", False) and started_as_rank_zero():
            print(OmegaConf.to_yaml(self.config, resolve=False), file=sys.stderr)
        seed = self.config.get("seed")
        if seed is not None:
            seed_everything(int(seed))
        modelpool, method, taskpool = self.build()
        environment = launch_environment()
        fabric = self._build_fabric()
        try:
            with overwrite_allowed(self.overwrite):
                return self._run_on_rank(fabric, modelpool, method, taskpool, started)
        finally:
            end_process_group(fabric, environment)

    def _run_on_rank(
        self,
        fabric: Any,
        modelpool: BaseModelPool,
        method: BaseAlgorithm,
        taskpool: BaseTaskPool | None,
        started: float,
    ) -> dict[str, Any]:
        """Fuse, evaluate and report on this process (rank 0 prints and writes)."""
        method.fabric = fabric
        method.taskpool = taskpool  # methods that evaluate intermediate models (continual merging) use it
        start = time.perf_counter()
        model = self.model = method.run(modelpool)
        fusion_seconds = time.perf_counter() - start
        if self.merged_model_save_path is not None and fabric.is_global_zero:
            path = modelpool.save_model(
                model, self.merged_model_save_path, description=self._model_card(method, modelpool)
            )
            log.info("merged model saved to %s", path)
        report: dict[str, Any] = {"model_info": model_info(model)}
        if taskpool is not None:
            taskpool.fabric = fabric
            report.update({k: v for k, v in taskpool.evaluate(model).items() if k != "model_info"})
        report.update(method.extra_report())
        times = {
            "fusion_seconds": fusion_seconds,
            "total_seconds": time.perf_counter() - start,
            "wall_seconds": time.perf_counter() - started,
        }
        report["meta"] = self._meta(taskpool, modelpool, fabric, times)
        try:
            check_finite_json(report)
        except ValueError as err:
            raise NonFiniteReportError(f"{err}: the run produced a non-finite number; no report written") from None
        if fabric.is_global_zero:
            if self.report_save_path is not None:
                atomic_write_json(self.report_save_path, report)
            if self.print_json:
                print(json.dumps(report, indent=2, allow_nan=False))
            print_report(report, self.report_save_path, file=sys.stderr if self.print_json else sys.stdout)
        return report

    def _model_card(self, method: BaseAlgorithm, modelpool: BaseModelPool) -> str:
        models = "\n".join(f"- `{n}`: {modelpool.get_model_config(n)}" for n in modelpool.all_model_names)
        return (
            f"# Merged model\n\nMade with FusionBench {fusion_bench.__version__} by `{method!r}` "
            f"(seed {self.config.get('seed')}) from:\n\n{models}\n\n"
            f"Method config:\n\n```yaml\n{OmegaConf.to_yaml(self.config.method)}```\n"
        )

    def _resolved_config(self) -> Any:
        from omegaconf.errors import OmegaConfBaseException

        try:
            return OmegaConf.to_container(self.config, resolve=True)
        except OmegaConfBaseException:  # an interpolation that only resolves elsewhere (${hydra:} outside Hydra)
            return OmegaConf.to_container(self.config, resolve=False)

    def _checkpoints(self, modelpool: BaseModelPool) -> dict[str, Any]:
        mode = self.checkpoint_hash
        sources = modelpool.checkpoint_sources()
        for source in sources.values():
            source["files"] = [file_fingerprint(f, mode=mode) if mode else {"file": str(f)} for f in source["files"]]
        return sources

    def _meta(
        self, taskpool: BaseTaskPool | None, modelpool: BaseModelPool, fabric: Any, times: dict[str, float]
    ) -> dict[str, Any]:
        """What a reader needs to reproduce the report (README: "What a report records")."""
        import torch
        import transformers

        meta: dict[str, Any] = {
            "fusion_bench_version": fusion_bench.__version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "seed": self.config.get("seed"),
            **{k: round(v, 3) for k, v in times.items()},
            "fast_dev_run": bool(self.config.get("fast_dev_run", False)),
            "accuracy_type": ACCURACY_TYPE,
        }
        if taskpool is not None and hasattr(taskpool, "evaluation_meta"):
            meta.update(taskpool.evaluation_meta())
        memory = peak_memory()
        meta["peak_memory"] = memory if world_size(fabric) == 1 else _per_rank(fabric, memory)
        meta["device"] = {
            "accelerator": type(fabric.accelerator).__name__,
            "world_size": world_size(fabric),
            "precision": str(fabric.strategy.precision.precision),
        }
        meta["checkpoint_hash"] = {"sampled": SAMPLED_HASH, "full": "sha256 of every byte"}.get(
            self.checkpoint_hash, "none"
        )
        meta["checkpoints"] = self._checkpoints(modelpool) if fabric.is_global_zero else {}
        meta["packages"] = package_versions()
        meta["hydra"] = hydra_job_meta()
        meta["config"] = self._resolved_config()
        return meta


def _per_rank(fabric: Any, memory: dict[str, float]) -> dict[str, list[float]]:
    """``{key: [value of rank 0, rank 1, ...]}`` of every rank's :func:`peak_memory`."""
    import torch

    keys = sorted(memory)
    gathered = fabric.all_gather(torch.tensor([memory[k] for k in keys], dtype=torch.float64, device=fabric.device))
    return {k: [round(float(v), 1) for v in gathered[:, i].tolist()] for i, k in enumerate(keys)}
