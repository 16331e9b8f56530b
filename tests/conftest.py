"""Shared fixtures: everything offline, every write under pytest's tmp dirs."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point every cache (ours and Hugging Face's) into the session's tmp dir."""
    root = tmp_path_factory.mktemp("caches")
    os.environ["FUSION_BENCH_CACHE_DIR"] = str(root / "fusion_bench")
    os.environ["HF_HOME"] = str(root / "hf")
    os.environ["FUSION_BENCH_EXAMPLE_DIR"] = str(root / "example")


@pytest.fixture(scope="session")
def tiny_example(_isolated_caches: None):
    """The built-in example (tiny CLIP, 3 fine-tuned variants, 3 datasets), built once."""
    from fusion_bench.testing import build_tiny_example

    return build_tiny_example(Path(os.environ["FUSION_BENCH_EXAMPLE_DIR"]))


def run_cli(
    args: list[str], cwd: Path, timeout: int = 300, *, fresh_process: bool = False
) -> subprocess.CompletedProcess:
    """Run ``fusion_bench *args`` with cwd ``cwd`` (so Hydra writes there); stdout, stderr and the exit status.

    By default the command runs in this (warm) interpreter, as the console script would run it
    (:func:`run_cli_in_process`): the behaviour under test is the command's, not the start of a
    process. ``fresh_process=True`` starts a new interpreter, for what is about the process itself
    (processes started by re-running the command line, launchers pickling the job, timeouts).
    """
    if not fresh_process:
        return run_cli_in_process(args, cwd)
    return subprocess.run(
        [sys.executable, "-m", "fusion_bench", *args],
        cwd=cwd,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_cli_in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``fusion_bench *args`` in this process: ``main()`` with ``sys.argv`` set, cwd ``cwd``, stdout/stderr
    captured, the exit status from ``SystemExit``; Hydra's global state is cleared afterwards."""
    import contextlib
    import io

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from fusion_bench.scripts.cli import main

    out, err = io.StringIO(), io.StringIO()
    here, argv = os.getcwd(), sys.argv
    os.chdir(cwd)
    sys.argv = ["fusion_bench", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(here)
        sys.argv = argv
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None  # type: ignore[assignment]
    return subprocess.CompletedProcess(["fusion_bench", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_classification_example(_isolated_caches: None):
    """Tiny ViTs and ResNets (pre-trained + one fine-tuned per task) and their 2 datasets, built once
    where the configs' ``${fusion_bench_classification_example:...}`` resolver finds them."""
    from fusion_bench.example import classification_example_root
    from fusion_bench.testing.tiny_classifiers import build_tiny_classification_example

    return build_tiny_classification_example(classification_example_root())


def tiny_clip_pool(example, tasks, test_tasks=None, base=None, finetuned=None):
    """A CLIP vision model pool of the tiny example: ``_pretrained_`` (or ``base``), the experts of ``tasks``
    (from ``finetuned`` when given) and the test splits of ``test_tasks`` (default: ``tasks``)."""
    from fusion_bench.modelpool import CLIPVisionModelPool

    models = {
        "_pretrained_": str(base or example.base_model),
        **{t: str((finetuned or example.finetuned)[t]) for t in tasks},
    }
    test = {
        t: {"path": str(example.datasets[t]), "split": "test"} for t in (tasks if test_tasks is None else test_tasks)
    }
    return CLIPVisionModelPool(models, test_datasets=test)


@contextlib.contextmanager
def sigint_not_ignored():
    """Around starting a child the test stops with SIGINT (Ctrl-C): SIGINT not ignored, so the child inherits it
    at its default and Python raises KeyboardInterrupt there.

    A test session started in the background (``cmd &`` in a script, ``nohup``) has SIGINT ignored, and children
    inherit that. Done in the parent (main thread) rather than in a ``preexec_fn``, which is unsafe with threads.
    """
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupt_after_step(method, at: int):
    """Make ``method`` (WEMoE and the methods built on its loop) raise KeyboardInterrupt right after its step
    ``at``, its periodic state written: an interrupted run to resume."""
    after_step = method._after_step

    def crash(step, *args):
        after_step(step, *args)
        if step == at:
            raise KeyboardInterrupt

    method._after_step = crash
    return method
