"""Shared fixtures: everything offline, every write under pytest's tmp dirs."""

from __future__ import annotations

import os
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


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``fusion_bench`` in a subprocess with cwd ``cwd`` (so Hydra writes there)."""
    return subprocess.run(
        [sys.executable, "-m", "fusion_bench", *args],
        cwd=cwd,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def tiny_classification_example(_isolated_caches: None):
    """Tiny ViTs and ResNets (pre-trained + one fine-tuned per task) and their 2 datasets, built once
    where the configs' ``${fusion_bench_classification_example:...}`` resolver finds them."""
    from fusion_bench.example import classification_example_root
    from fusion_bench.testing.tiny_classifiers import build_tiny_classification_example

    return build_tiny_classification_example(classification_example_root())
