"""The built-in offline benchmark ("mini-clip"): eight generated image-domain tasks and a tiny CLIP.

* :mod:`.domains` renders the shipped design's eight tasks, each its own image domain mirroring one
  of the real eight CLIP tasks (``scenes`` for SUN397, ..., ``textures`` for DTD;
  :data:`BENCHMARK_TASKS`); :mod:`.v2` builds their datasets and the pre-training pool
  (docs/mini_clip_benchmark.md).
* The first design (docs/mini_clip_benchmark_v1.md; no longer shipped) lives beside it: :mod:`.scenes`
  renders 32×32 scenes (a coloured shape, handwritten digit or dots on a textured background),
  :mod:`.tasks` defines its eight tasks (:data:`MINI_TASKS`), each labelling a different attribute,
  and :mod:`.captions` describes scenes for its pre-training.
* The shipped design's models (a contrastively pre-trained tiny CLIP and eight fine-tuned vision
  encoders) ship in the package under ``fusion_bench/assets/mini-clip`` and are rebuilt from scratch
  by ``python -m fusion_bench.scripts.build_mini_clip`` (``--design v1``: the first design's).

Configs refer to both with the ``${fusion_bench_mini:...}`` resolver:

* ``${fusion_bench_mini:models/clip-mini}``: a shipped model folder (or, with
  ``$FUSION_BENCH_MINI_CLIP_DIR`` set, the folder of the same name there: a rebuild);
* ``${fusion_bench_mini:datasets/scenes}``: a task's ``save_to_disk`` folder, generated on first
  use (seconds, deterministic) into ``mini_tasks-design2-v2`` beside the first design's folder
  ``$FUSION_BENCH_MINI_TASKS_DIR`` (default ``$FUSION_BENCH_CACHE_DIR/mini_tasks-v1``, so
  ``$FUSION_BENCH_CACHE_DIR/mini_tasks-design2-v2``; ``FUSION_BENCH_CACHE_DIR`` defaults to
  ``~/.cache/fusion_bench``), where the first design's tasks go.

Importing this package registers the resolver with OmegaConf (like a method registering its
name where it is defined); :func:`register_resolvers` does it explicitly and is idempotent.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

from fusion_bench.data.mini_tasks.captions import caption, caption_vocabulary_corpus
from fusion_bench.data.mini_tasks.domains import DOMAINS
from fusion_bench.data.mini_tasks.scenes import KINDS, Scene, render_scene, sample_scene
from fusion_bench.data.mini_tasks.tasks import (
    DATASET_FORMAT,
    MINI_TASKS,
    MiniTask,
    build_mini_task_datasets,
    build_task_dataset,
    get_mini_task,
    task_text,
)
from fusion_bench.errors import ConfigError
from fusion_bench.utils.paths import cache_root

__all__ = [
    "BENCHMARK_TASKS",
    "KINDS",
    "MINI_TASKS",
    "RESOLVER",
    "MiniTask",
    "Scene",
    "benchmark_datasets_root",
    "build_mini_task_datasets",
    "build_task_dataset",
    "caption",
    "caption_vocabulary_corpus",
    "get_mini_task",
    "mini_clip_dir",
    "mini_path",
    "mini_tasks_root",
    "register_resolvers",
    "render_scene",
    "sample_scene",
    "task_text",
]

RESOLVER = "fusion_bench_mini"
BENCHMARK_TASKS: tuple[str, ...] = tuple(DOMAINS)
"""The shipped benchmark's eight tasks, in its configs' order (the current design, each task its own image domain:
:mod:`.domains`); the first design's tasks are :data:`MINI_TASKS`."""


def mini_clip_dir() -> Path:
    """The folder of the mini CLIP models: ``$FUSION_BENCH_MINI_CLIP_DIR`` or the shipped assets."""
    if os.environ.get("FUSION_BENCH_MINI_CLIP_DIR"):
        return Path(os.environ["FUSION_BENCH_MINI_CLIP_DIR"]).expanduser().absolute()
    return Path(str(resources.files("fusion_bench") / "assets" / "mini-clip"))


def mini_tasks_root() -> Path:
    """Where the tasks' datasets are generated (see module docstring)."""
    if os.environ.get("FUSION_BENCH_MINI_TASKS_DIR"):
        return Path(os.environ["FUSION_BENCH_MINI_TASKS_DIR"]).expanduser()
    return cache_root() / f"mini_tasks-v{DATASET_FORMAT}"


def benchmark_datasets_root() -> Path:
    """The folder of the shipped tasks' datasets (:data:`BENCHMARK_TASKS`, 2,000 train / 500 test images each),
    generated on first use; the configs' ``${fusion_bench_mini:datasets/<task>}`` are its sub-folders."""
    from fusion_bench.scripts.build_mini_clip_v2 import MiniClipRecipeV2, datasets_root_v2

    return datasets_root_v2(MiniClipRecipeV2.n_train, MiniClipRecipeV2.n_test)


def mini_path(relative: str) -> str:
    """Absolute path of ``models/<name>`` or ``datasets/<task>`` (see module docstring).

    Args:
        relative: ``"models/<model folder>"`` or ``"datasets/<task>"``.

    Returns:
        the path; for datasets, after building them if needed.

    Raises:
        ConfigError: ``relative`` names neither kind, or an unknown task or model.
    """
    kind, _, name = str(relative).partition("/")
    if kind == "models" and name:
        path = mini_clip_dir() / name
        if not path.is_dir():
            known = sorted(p.name for p in mini_clip_dir().glob("*") if p.is_dir())
            raise ConfigError(
                f"${{{RESOLVER}:{relative}}}: no model {name!r} in {str(mini_clip_dir())!r}; models: {known}"
            )
        return str(path)
    if kind == "datasets" and name in DOMAINS:  # the shipped design's tasks
        return str(benchmark_datasets_root() / name)
    if kind == "datasets" and name in MINI_TASKS:  # the first design's (docs/mini_clip_benchmark_v1.md)
        return str(build_mini_task_datasets(mini_tasks_root()) / name)
    raise ConfigError(
        f"${{{RESOLVER}:{relative}}}: expected 'models/<name>' or 'datasets/<task>' with a task among"
        f" {', '.join(DOMAINS)} (first design: {', '.join(MINI_TASKS)})"
    )


def register_resolvers() -> None:
    """Register the ``${fusion_bench_mini:...}`` resolver with OmegaConf (idempotent)."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, mini_path)


register_resolvers()
