"""``hydra/launcher=ray``: each job of a sweep as one Ray task, on a running cluster or a local Ray.

Config (``fusion_bench/config/hydra/launcher/ray.yaml``): ``ray.init`` is passed to ``ray.init()``
(``address: auto`` joins the running cluster, ``host:port`` a given one, null starts Ray here) and
``ray.remote`` to ``ray.remote()`` (``num_cpus``, ``num_gpus``, ``max_calls``, ...). A job's stdout
and stderr go to ``<sweep dir>/.ray/<job number>.log``. The launcher waits for every job, keeps the
finished jobs' reports and names each failed job and its log (then exits 1).

We ship this instead of hydra-ray-launcher 1.2.2: that plugin requires ``cloudpickle<3`` (and, for
its AWS launcher, boto3, whose botocore requires ``python-dateutil<3``), so installing it
downgrades packages the rest of the stack uses; and it collects results with ``ray.get`` in job
order, so the first failed job ends the sweep while later jobs are still running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from ._jobs import JobFailure, exit_if_failed, failure_of_return, last_line, print_job_error, split_finished

log = logging.getLogger(__name__)


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to ``path`` for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)


def run_job_on_worker(
    hydra_context: HydraContext,
    sweep_config: DictConfig,
    task_function: TaskFunction,
    singleton_state: dict[Any, Any],
    log_path: str,
) -> JobReturn | str:
    """Run one job in a Ray worker (Hydra's ``run_job``); its output goes to ``log_path``.

    Returns the job's :class:`JobReturn` (an exception raised inside the job is in it), or, when
    the job exited (``sys.exit``, e.g. a one-line ``fusion_bench: error``), the reason as a string.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job, setup_globals

    with output_to(Path(log_path)):
        setup_globals()
        Singleton.set_state(singleton_state)
        import ray

        with open_dict(sweep_config):  # the job's id is its Ray task's, as SLURM's job id under slurm
            sweep_config.hydra.job.id = ray.get_runtime_context().get_task_id()
        HydraConfig.instance().set_config(sweep_config)
        try:
            return print_job_error(
                run_job(
                    hydra_context=hydra_context,
                    task_function=task_function,
                    config=sweep_config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
        except SystemExit as stop:
            if stop.code in (None, 0):
                return "the job exited (status 0) before returning"
            sys.stderr.flush()
            return f"exit status {stop.code}: " + last_line(Path(log_path), "no output")


class RayLauncher(Launcher):
    """Runs each job of a sweep as a Ray task and waits for all of them."""

    def __init__(self, ray: DictConfig | dict[str, Any]) -> None:
        cfg = OmegaConf.to_container(ray, resolve=True) if OmegaConf.is_config(ray) else dict(ray)
        self.init: dict[str, Any] = dict(cfg.get("init") or {})
        self.remote: dict[str, Any] = {k: v for k, v in (cfg.get("remote") or {}).items() if v is not None}
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        assert self.config is not None and self.hydra_context is not None
        to_run, returns = split_finished(self.hydra_context, self.config, job_overrides, initial_job_idx)
        if not to_run:
            log.info(f"all {len(returns)} jobs have their reports (skip_existing_report=true): nothing submitted")
            return returns
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if not ray.is_initialized():
            ray.init(**self.init)
        log.info(f"Ray sweep output dir : {sweep_dir} (cluster: {ray.get_runtime_context().gcs_address})")
        task = ray.remote(**self.remote)(run_job_on_worker) if self.remote else ray.remote(run_job_on_worker)
        submitted = []
        for num, overrides in to_run:
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(sweep_config):
                sweep_config.hydra.job.num = num
            log_path = sweep_dir / ".ray" / f"{num}.log"
            ref = task.remote(
                self.hydra_context, sweep_config, self.task_function, Singleton.get_state(), str(log_path)
            )
            submitted.append((num, overrides, log_path, ref))
        log.info("submitted Ray tasks: %s", " ".join(ref.task_id().hex() for *_, ref in submitted))
        ray.wait([ref for *_, ref in submitted], num_returns=len(submitted))  # every job, failed or not
        failures = []
        for num, overrides, log_path, ref in submitted:
            where = f"Ray task {ref.task_id().hex()}"
            try:
                ret = ray.get(ref)
            except Exception as error:  # the worker died, or Ray could not run the task
                reason = f"{type(error).__name__}: {last_line(log_path, (str(error).strip().splitlines() or ['no output'])[0])}"
                failures.append(JobFailure(num, overrides, reason, where, log_path))
                continue
            failure = (
                JobFailure(num, overrides, ret, where, log_path)
                if isinstance(ret, str)
                else failure_of_return(ret, num, overrides, where, log_path)
            )
            if failure is not None:
                failures.append(failure)
            else:
                returns.append(ret)
        exit_if_failed(failures, len(job_overrides))
        return returns
