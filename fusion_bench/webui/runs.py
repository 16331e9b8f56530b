"""The run queue: ``fusion_bench`` runs started from the page, one at a time, as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Run", "RunQueue", "command_argv"]

MAX_LOG_LINES = 20000


def command_argv(overrides: list[str], config_dir: str | None = None) -> list[str]:
    """The argument list of a ``fusion_bench`` run (never a shell string)."""
    return [sys.executable, "-m", "fusion_bench", *(["--config-dir", config_dir] if config_dir else []), *overrides]


@dataclass
class Run:
    """One run: its argument list, state and log."""

    id: str
    argv: list[str]
    report_path: Path
    state: str = "queued"  # queued, running, done, failed, cancelled
    returncode: int | None = None
    log: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    def as_dict(self, since: int = 0) -> dict[str, Any]:
        """The run for the page; ``log`` holds the lines from ``since`` on."""
        end = self.ended or time.time()
        return {
            "id": self.id,
            "argv": self.argv[1:],
            "state": self.state,
            "returncode": self.returncode,
            "report": str(self.report_path) if self.report_path.is_file() else None,
            "elapsed": round(end - self.started, 1) if self.started else None,
            "log_start": since,
            "log": self.log[since:],
            "log_end": len(self.log),
        }


class RunQueue:
    """Runs queued in order; one runs at a time; each writes its report under ``runs_dir/<id>/``."""

    def __init__(self, runs_dir: Path, config_dir: str | None = None) -> None:
        self.runs_dir = runs_dir
        self.config_dir = config_dir
        self.runs: dict[str, Run] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="fusion_bench_webui-runs", daemon=True)
        self._worker.start()

    def submit(self, overrides: list[str]) -> Run:
        """Queue a run of ``fusion_bench`` with ``overrides`` (its report goes to ``<id>/report.json``
        unless the overrides name a ``report_save_path``)."""
        with self._lock:
            run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{len(self.runs) + 1:03d}"
            folder = (self.runs_dir / run_id).resolve()
            own = [o for o in overrides if o.split("=", 1)[0].lstrip("+") == "report_save_path"]
            report = Path(own[-1].split("=", 1)[1]) if own else folder / "report.json"
            extra = [] if own else [f"report_save_path={report}"]
            argv = command_argv([*overrides, *extra, f"hydra.run.dir={folder}"], self.config_dir)
            run = self.runs[run_id] = Run(run_id, argv, report)
            self._wake.notify_all()
            return run

    def cancel(self, run_id: str) -> Run | None:
        """Cancel a queued run, or stop a running one (SIGTERM to its process group, then SIGKILL)."""
        with self._lock:
            run = self.runs.get(run_id)
            if run is None or run.state not in ("queued", "running"):
                return run
            if run.state == "queued":
                run.state, run.ended = "cancelled", time.time()
                return run
            run.state = "cancelled"
            process = run.process
        if process is not None:
            _stop(process)
        return run

    def close(self) -> None:
        """Cancel everything (on shutdown)."""
        with self._lock:
            self._closed = True
            ids = list(self.runs)
            self._wake.notify_all()
        for run_id in ids:
            self.cancel(run_id)

    def _next(self) -> Run | None:
        with self._lock:
            while not self._closed:
                queued = [r for r in self.runs.values() if r.state == "queued"]
                if queued:
                    run = queued[0]
                    run.state, run.started = "running", time.time()
                    return run
                self._wake.wait()
            return None

    def _work(self) -> None:
        while (run := self._next()) is not None:
            self._execute(run)

    def _execute(self, run: Run) -> None:
        run.report_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            process = subprocess.Popen(
                run.argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                bufsize=1,
                env=env,
                start_new_session=True,
            )
        except OSError as err:
            run.log.append(f"fusion_bench_webui: error: cannot start the run: {err}")
            run.state, run.ended = "failed", time.time()
            return
        with self._lock:
            run.process = process
            cancelled = run.state == "cancelled"
        if cancelled:
            _stop(process)
        assert process.stdout is not None
        for line in process.stdout:
            for part in line.rstrip("\n").split("\r"):  # progress bars redraw with \r
                if part.strip() and len(run.log) < MAX_LOG_LINES:  # the page reads the log by line number
                    run.log.append(part)
        run.returncode = process.wait()
        with self._lock:
            run.ended = time.time()
            if run.state != "cancelled":
                run.state = "done" if run.returncode == 0 else "failed"


def _stop(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group; SIGKILL it if it is still there after ``grace`` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
