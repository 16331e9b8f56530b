"""What the cluster launchers share: one failed job's description and the sweep's exit."""

from __future__ import annotations

import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.types import HydraContext
from omegaconf import DictConfig

log = logging.getLogger(__name__)

__all__ = [
    "JobFailure",
    "failure_of_return",
    "last_line",
    "exit_if_failed",
    "print_job_error",
    "report_path_of",
    "split_finished",
]


@dataclass(frozen=True)
class JobFailure:
    """A sweep job that did not finish: its number, overrides, why, where it ran and its log."""

    num: int
    overrides: Sequence[str]
    reason: str
    where: str
    log: Path | None

    def line(self) -> str:
        """One ``fusion_bench: error:`` line naming the job and its log."""
        overrides = " ".join(filter_overrides(self.overrides))
        log = f"; log: {self.log}" if self.log is not None else ""
        return f"fusion_bench: error: sweep job #{self.num} ({overrides}) failed ({self.where}): {self.reason}{log}"


_ENGINE_PREFIXES = ("srun: ", "slurmstepd: ", "submitit ")  # the engine's own lines about the step that failed


def last_line(path: Path | None, default: str) -> str:
    """What a job's stderr file ``path`` says went wrong, else ``default``: its last ``fusion_bench: error:``
    line (a one-line input error), or its last non-empty line that is not the engine's own (``srun: error:
    ... Exited with exit code 2`` only repeats the exit status)."""
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except (OSError, TypeError):
        return default
    ours = [ln for ln in lines if ln.startswith("fusion_bench: error:")]
    jobs = [ln for ln in lines if not ln.startswith(_ENGINE_PREFIXES)]
    return (ours or jobs or lines or [default])[-1][:500]


def failure_of_return(ret: Any, num: int, overrides: Sequence[str], where: str, log: Path | None) -> JobFailure | None:
    """The failure a Hydra :class:`JobReturn` stands for (an exception inside the job), or None."""
    if isinstance(ret, JobReturn) and ret.status != JobStatus.FAILED:
        return None
    if isinstance(ret, JobReturn):
        error = ret._return_value  # the job's exception (reading .return_value re-raises it)
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    else:
        reason = f"the job returned {type(ret).__name__}, not a Hydra JobReturn"
    return JobFailure(num, list(overrides), reason, where, log)


def print_job_error(ret: Any) -> Any:
    """In the job's process: print the traceback of a failed :class:`JobReturn` to stderr (the
    job's log; Hydra only keeps the exception in the return value). Returns ``ret``."""
    if isinstance(ret, JobReturn) and ret.status == JobStatus.FAILED:
        error = ret._return_value
        overrides = " ".join(filter_overrides(ret.overrides or []))
        print(f"Error executing job with overrides: {overrides}", file=sys.stderr)
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
        sys.stderr.flush()
    return ret


def exit_if_failed(failures: Sequence[JobFailure], num_jobs: int) -> None:
    """Print one line per failed job and exit with status 1; return when none failed."""
    if not failures:
        return
    sys.stdout.flush()
    print(
        f"fusion_bench: error: {len(failures)} of {num_jobs} sweep jobs failed (the other jobs' reports are kept):",
        file=sys.stderr,
    )
    for failure in sorted(failures, key=lambda f: f.num):
        print(failure.line(), file=sys.stderr)
    sys.stderr.flush()
    raise SystemExit(1)


def report_path_of(sweep_config: DictConfig) -> Path | None:
    """Where a sweep job writes its report (``report_save_path``; null: its job folder's
    ``report.json``), or None when it writes none or the path cannot be resolved here."""
    from fusion_bench.utils.paths import NO_PATH_VALUES

    try:
        value = sweep_config.get("report_save_path")
        if value is None or value == "null":
            return Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir) / "report.json"
    except Exception:  # an interpolation only the job can resolve: let the job decide
        return None
    return Path(value) if isinstance(value, str) and value not in NO_PATH_VALUES else None


def split_finished(
    hydra_context: HydraContext, config: DictConfig, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
) -> tuple[list[tuple[int, list[str]]], list[JobReturn]]:
    """With ``skip_existing_report=true``: the jobs to submit ``(number, overrides)`` and the
    returns of the jobs whose report already exists (same ``fast_dev_run``), which are not
    submitted at all. Without it every job is submitted."""
    from fusion_bench.program.hydra_job import existing_report

    to_run, finished = [], []
    for num, overrides in enumerate(job_overrides, start=initial_job_idx):
        overrides = list(overrides)
        sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
        path = report_path_of(sweep_config) if sweep_config.get("skip_existing_report") is True else None
        report = existing_report(str(path), fast_dev_run=sweep_config.get("fast_dev_run", False)) if path else None
        if report is None:
            to_run.append((num, overrides))
            continue
        log.info(
            f"\t#{num} : {' '.join(filter_overrides(overrides))}: {path} exists; not submitted (skip_existing_report=true)"
        )
        finished.append(
            JobReturn(
                overrides=overrides,
                cfg=sweep_config,
                hydra_cfg=sweep_config,
                working_dir=str(Path.cwd()),
                task_name=str(sweep_config.hydra.job.name),
                status=JobStatus.COMPLETED,
                _return_value=report,
            )
        )
    return to_run, finished
