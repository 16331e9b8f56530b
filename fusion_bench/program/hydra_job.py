"""The program's view of its Hydra job: sweeps, the default report path, re-launches, DDP children.

* In a multirun (``fusion_bench -m ...``) each job writes ``report.json`` in its own job folder,
  ``${hydra.sweep.dir}/${hydra.sweep.subdir}``; the root config makes the subfolder the job's
  overrides (``hydra.job.override_dirname``) made safe by :func:`job_dir_name` (one level, path
  values shortened to their last part and a hash), so a job's report path depends only on its
  overrides and a re-launch with ``skip_existing_report=true`` finds what the last launch finished.
* ``fabric.strategy=ddp`` starts one process per device by re-running the command line
  (Lightning's subprocess launcher). Inside a multirun the command line is the whole sweep, so
  :func:`job_command_line` hands the child processes this job's overrides and folder instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

from fusion_bench.errors import ConfigError
from fusion_bench.utils.paths import optional_path

__all__ = [
    "job_dir_name",
    "register_job_dir_resolver",
    "hydra_job_meta",
    "is_multirun",
    "default_report_path",
    "existing_report",
    "job_command_line",
    "check_process_launch",
]

_SWEEP_ONLY = ("hydra.mode", "hydra.sweep", "hydra/sweeper", "hydra.sweeper", "hydra/launcher", "hydra.launcher")


_MAX_DIR_NAME = 200  # file systems allow 255 bytes
_UNSAFE = re.compile(r"[^\w.=,+-]")
_ITEM_START = re.compile(r",(?=[\w.+~/-]+=)")  # the ',' before the next 'key=' of override_dirname


def _short_hash(text: str, digits: int = 8) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:digits]


def _safe_value(value: str) -> str:
    """A value fit for a folder name: a path becomes its last part and a hash of the whole."""
    if "/" in value or "\\" in value:
        last = value.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1] or "root"
        value = f"{last}-{_short_hash(value, 6)}"
    return _UNSAFE.sub("_", value)


def job_dir_name(override_dirname: str) -> str:
    """The folder name of a sweep job from Hydra's ``key=value,key=value`` string.

    One path level (no ``/``), no characters outside ``[A-Za-z0-9_.=,+-]``, at most 200 characters
    (longer names keep their start and end in a hash of the whole); the same overrides always
    give the same name, and different overrides different names.
    """
    if not override_dirname:
        return "default"
    items = []
    for item in _ITEM_START.split(override_dirname):
        key, sep, value = item.partition("=")
        if "." not in key:  # a config group's choice (modelpool=Group/name): not a path
            value = value.replace("/", ".")
        items.append(f"{_UNSAFE.sub('_', key.replace('/', '.'))}{sep}{_safe_value(value)}")
    name = ",".join(items)
    if len(name) > _MAX_DIR_NAME or name in (".", ".."):
        name = f"{name[: _MAX_DIR_NAME - 9]}~{_short_hash(override_dirname)}"
    return name


def register_job_dir_resolver() -> None:
    """Register ``${fusion_bench_job_dir:...}`` (the root config's ``hydra.sweep.subdir``)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("fusion_bench_job_dir"):
        OmegaConf.register_new_resolver("fusion_bench_job_dir", lambda s="": job_dir_name(str(s)))


def _hydra_config() -> Any:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def is_multirun() -> bool:
    """Whether this process runs one job of a Hydra multirun."""
    from hydra.types import RunMode

    hc = _hydra_config()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def default_report_path(value: Any) -> str | None:
    """The report path of ``report_save_path=value``.

    ``null`` means ``<job folder>/report.json`` (Hydra's run folder in a single run, the job's
    folder in a multirun; print only outside Hydra); ``false`` (or ``""``, ``none``) never
    writes; a string is the path.

    Raises:
        ConfigError: ``value`` is neither a path nor one of those.
    """
    if value is None or value == "null":
        hc = _hydra_config()
        return str(Path(hc.runtime.output_dir) / "report.json") if hc is not None and hc.runtime.output_dir else None
    return optional_path(value, "report_save_path")


def existing_report(path: str, *, fast_dev_run: Any) -> dict[str, Any] | None:
    """The finished report at ``path`` if it stands for the run about to start, else None.

    A report counts when it is a JSON object with ``meta`` whose ``fast_dev_run`` equals this run's
    (a one-batch report never stands for a full run, nor the reverse). Reports are written
    atomically, so an interrupted run leaves none.
    """
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not isinstance(report.get("meta"), dict):
        return None
    return report if bool(report["meta"].get("fast_dev_run")) == bool(fast_dev_run) else None


def hydra_job_meta() -> dict[str, Any] | None:
    """The job's config choices, overrides, mode and folder (None outside Hydra)."""
    from omegaconf import OmegaConf

    hc = _hydra_config()
    if hc is None:
        return None
    return {
        "mode": hc.mode.name if hc.mode is not None else None,
        "choices": {k: v for k, v in OmegaConf.to_container(hc.runtime.choices).items() if not k.startswith("hydra/")},
        "overrides": list(hc.overrides.task),
        "output_dir": hc.runtime.output_dir,
    }


@contextlib.contextmanager
def job_command_line() -> Iterator[None]:
    """In a multirun: ``sys.argv`` = this job's overrides and ``hydra.run.dir`` = its folder, for the
    children that Lightning's subprocess launcher starts (they run the job in single-run mode)."""
    from omegaconf import read_write

    if not is_multirun():
        yield
        return
    hc, argv = _hydra_config(), sys.argv
    hydra_overrides = [o for o in hc.overrides.hydra if not o.lstrip("+~").startswith(_SWEEP_ONLY)]
    sys.argv = [argv[0], *hc.overrides.task, *hydra_overrides]
    with read_write(hc.run):
        run_dir, hc.run.dir = hc.run.dir, hc.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        with read_write(hc.run):
            hc.run.dir = run_dir


def check_process_launch(fabric: Any) -> None:
    """Raise a :class:`ConfigError` when ``fabric`` cannot start its processes from this program.

    Spawn-type strategies need a function to start; re-running the command line needs a
    ``fusion_bench`` command (not, e.g., a joblib launcher's worker process).
    """
    import __main__

    from fusion_bench.utils.fabric import subprocess_launcher_types

    launcher = fabric.strategy.launcher
    strategy = type(fabric.strategy).__name__
    if launcher is None:
        return
    if not isinstance(launcher, subprocess_launcher_types()):
        raise ConfigError(f"fabric.strategy: {strategy} ({type(launcher).__name__}) is not supported; use strategy=ddp")
    spec = getattr(__main__, "__spec__", None)
    main = spec.name if spec is not None else Path(sys.argv[0]).name
    if not launcher.cluster_environment.creates_processes_externally and "fusion_bench" not in main:
        raise ConfigError(
            f"fabric.strategy=ddp with {fabric.world_size} devices re-runs the fusion_bench command per device, "
            f"which cannot be done from {main!r} (a launcher's worker process); use Hydra's basic launcher, "
            f"or a SLURM launcher with tasks_per_node equal to fabric.devices"
        )
