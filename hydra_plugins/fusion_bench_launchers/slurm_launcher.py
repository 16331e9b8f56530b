"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher, waiting for the whole sweep.

Jobs are submitted exactly as the upstream plugin does (one ``sbatch`` job array, every
``SlurmQueueConf`` field honoured). What differs is the end of a sweep: upstream returns the
jobs' results in order and stops at the first failed job (the later ones go on running unseen),
and it learns that a job died only from ``sacct``, which needs SLURM's accounting database.
This launcher waits for every job, reading its state from ``squeue`` (then ``sacct``) or its
result file, and reports each failed job with its log.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from omegaconf import OmegaConf

try:
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher
except ImportError:  # not installed: Hydra scans this module on every run, so no error here
    from hydra.plugins.launcher import Launcher as _SubmititSlurmLauncher

    BaseQueueConf = None

from ._jobs import JobFailure, exit_if_failed, failure_of_return, last_line, print_job_error, split_finished

log = logging.getLogger(__name__)

# a job in one of these states may still write its result; any other state is final
LIVE_STATES = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESIZING",
    "SUSPENDED",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
    "PREEMPTED",
    "RESV_DEL_HOLD",
}
POLL_SECONDS = float(os.environ.get("FUSION_BENCH_SLURM_POLL_S", "5"))


LEFT = "LEFT_QUEUE"  # the state of an array that neither squeue nor sacct knows (any more)


def _query(command: list[str]) -> dict[str, str] | None:
    """``{job id: state}`` from a ``squeue``/``sacct`` call printing ``id|state`` lines; None if it fails."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    states = {}
    for line in out.splitlines():
        job_id, _, state = line.strip().partition("|")
        if job_id and state and "." not in job_id:  # skip job steps (123_0.batch)
            states[job_id] = state.split()[0].rstrip("+")  # "CANCELLED by 0" -> CANCELLED
    return states


def slurm_states(array_ids: set[str]) -> dict[str, str]:
    """The states of the tasks of job arrays ``array_ids`` (``{"12_0": "RUNNING", ...}``).

    ``squeue --states=all`` knows every job the controller holds (finished ones for ``MinJobAge``
    seconds) and needs no accounting database; ``sacct`` fills in jobs the controller forgot. An
    array that squeue answered for without listing it, and sacct does not know, is ``{id: LEFT}``.
    """
    if not array_ids:
        return {}
    ids = ",".join(sorted(array_ids))
    queue = _query(["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={ids}"])
    states = dict(queue or {})
    missing = {a for a in array_ids if not any(k.split("_")[0] == a for k in states)}
    if missing:
        sacct = ["sacct", "--noheader", "--parsable2", "--format=JobID,State", f"--jobs={','.join(sorted(missing))}"]
        states.update(_query(sacct) or {})
        if queue is not None:  # squeue worked: the jobs it does not list have left the controller
            states.update({a: LEFT for a in missing if not any(k.split("_")[0] == a for k in states)})
    return states


class SlurmLauncher(_SubmititSlurmLauncher):
    """hydra-submitit-launcher's ``SlurmLauncher`` that waits for all jobs and reports each failure."""

    if BaseQueueConf is None:  # hydra-submitit-launcher is missing: say so when the launcher is chosen

        def __init__(self, **params: Any) -> None:
            raise ImportError("hydra/launcher=slurm needs hydra-submitit-launcher: pip install 'fusion_bench[slurm]'")

        def setup(self, **kwargs: Any) -> None:  # pragma: no cover - never constructed
            raise NotImplementedError

        def launch(self, *args: Any, **kwargs: Any) -> Sequence[JobReturn]:  # pragma: no cover
            raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """Run one job on its SLURM node; a failed job's traceback goes to its stderr log."""
        return print_job_error(super().__call__(*args, **kwargs))

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        to_run, returns = split_finished(self.hydra_context, self.config, job_overrides, initial_job_idx)
        if not to_run:
            log.info(f"all {len(returns)} jobs have their reports (skip_existing_report=true): nothing submitted")
            return returns
        jobs = self._submit(to_run)
        log.info("submitted SLURM jobs: %s", " ".join(str(j.job_id) for j in jobs))
        self._wait(jobs)
        failures = []
        for job, (num, overrides) in zip(jobs, to_run):
            ret, failure = self._outcome(job, num, overrides)
            if failure is not None:
                failures.append(failure)
            else:
                returns.append(ret)
        exit_if_failed(failures, len(job_overrides))
        return returns

    def _submit(self, to_run: list[tuple[int, list[str]]]) -> list[Any]:
        """Submit the jobs ``(number, overrides)`` as one job array, as hydra-submitit-launcher 1.2
        does (the same executor parameters); the submitit jobs."""
        import submitit

        assert self.config is not None
        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]},
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k not in init_keys}
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}")
        params = []
        for num, overrides in to_run:
            log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
            params.append((overrides, "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()))
        return executor.map_array(self, *zip(*params))

    @staticmethod
    def _wait(jobs: list[Any]) -> None:
        """Until every job left SLURM's live states (or, where SLURM no longer knows it, wrote its result)."""
        pending = {str(j.job_id): j for j in jobs}
        while pending:
            states = slurm_states({job_id.split("_")[0] for job_id in pending})
            for job_id, job in list(pending.items()):
                state = states.get(job_id, states.get(job_id.split("_")[0]))
                if (state not in LIVE_STATES) if state is not None else job.paths.result_pickle.exists():
                    del pending[job_id]
            if pending:
                time.sleep(POLL_SECONDS)

    @staticmethod
    def _outcome(job: Any, num: int, overrides: Sequence[str]) -> tuple[JobReturn | None, JobFailure | None]:
        """A finished job's :class:`JobReturn`, or why it failed."""
        log_path = job.paths.stderr
        where = f"SLURM job {job.job_id}"
        if not job.paths.result_pickle.exists():  # the process died: an exit status, a signal, a time limit
            array_id = str(job.job_id).split("_")[0]
            states = slurm_states({array_id})
            state = states.get(str(job.job_id), states.get(array_id, "UNKNOWN"))
            reason = last_line(log_path, "no output")
            return None, JobFailure(num, list(overrides), reason, f"{where}, {state}", log_path)
        try:
            ret = job.results()[0]
        except Exception as error:  # submitit's FailedJobError: an exception outside Hydra's run_job
            parts = str(error).split("-" * 22)  # "... trace:\n-----\n<traceback>\n-----\n..."
            trace = parts[1] if len(parts) > 2 else str(error)
            reason = ([ln.strip() for ln in trace.splitlines() if ln.strip()] or [type(error).__name__])[-1]
            return None, JobFailure(num, list(overrides), reason, where, log_path)
        return ret, failure_of_return(ret, num, overrides, where, log_path)
