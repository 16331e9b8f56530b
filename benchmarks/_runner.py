"""Shared by the timing scripts: run a whole process, measure its wall time and peak RSS, find the reference.

* ``ours``: this checkout's ``fusion_bench`` (``python -m fusion_bench`` with this repository first on
  ``PYTHONPATH``).
* ``before`` (optional, ``--before SRC``): the same command on another source tree (e.g. an export
  of an older commit), for a before/after table measured in the same run.
* ``reference``: FusionBench as published on PyPI, from the interpreter named by
  ``$FUSION_BENCH_REFERENCE_PYTHON`` (default ``/work/refvenv/bin/python`` when it exists); when
  there is none, the scripts print a skip line instead of its numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["Measured", "measure", "ours_env", "reference_python", "ratio", "REPO"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = Path("/work/refvenv/bin/python")


@dataclass(frozen=True)
class Measured:
    """One process: wall seconds, peak resident set size (bytes), exit status, the end of its stderr, and
    CPU seconds (user + system; on a loaded machine a steadier measure of the work than the wall)."""

    wall_s: float
    peak_rss: int
    returncode: int
    stderr_tail: str
    cpu_s: float = 0.0

    def line(self, label: str) -> str:
        return (
            f"{label:<28} {self.wall_s:7.2f} s wall  {self.cpu_s:7.2f} s CPU   peak RSS {self.peak_rss / 2**30:5.2f} GB"
        )


def measure(argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> Measured:
    """Run ``argv`` to completion; wall time from start to exit, peak RSS from the kernel (``wait4``)."""
    start = time.perf_counter()
    proc = subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return Measured(wall, usage.ru_maxrss * 1024, proc.returncode, stderr[-3000:], cpu)


def ours_env(source: Path = REPO, **extra: str) -> dict[str, str]:
    """The environment running ``fusion_bench`` from ``source`` (first on ``PYTHONPATH``), offline."""
    env = dict(os.environ, PYTHONPATH=str(source), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(extra)
    return env


def reference_python() -> Path | None:
    """The interpreter with the published FusionBench installed, or None."""
    named = os.environ.get("FUSION_BENCH_REFERENCE_PYTHON")
    path = Path(named) if named else DEFAULT_REFERENCE
    return path if path.exists() else None


def reference_skip_message() -> str:
    return (
        "reference: skipped (no interpreter with fusion-bench==0.2.33; set FUSION_BENCH_REFERENCE_PYTHON "
        f"or create {DEFAULT_REFERENCE})"
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def ours_python() -> str:
    return sys.executable
