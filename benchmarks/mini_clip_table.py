"""The results table of the built-in offline benchmark (mini CLIP, eight generated tasks).

Runs, through the fusion program (the same code path as the ``fusion_bench`` command, in one
process so the interpreter starts once):

* ``method=dummy`` on the pre-trained model and on each of the eight experts (the 9×8 matrix);
* every registered merging method (``fusion_bench.method.ALGORITHMS.names()``) with its
  shipped config (each YAML of a method is one row) on ``modelpool=CLIPVisionModelPool/mini-clip_TA8``,
  except methods that train or do not merge (:data:`SKIP`);

then writes the Markdown tables to ``docs/mini_clip_benchmark.md`` (between the markers
``<!-- mini-clip-table:start -->`` / ``end``) and, with ``--readme``, into README.md between
the same markers. Every run's JSON report is kept under ``--reports``. Run from the repository
root:  python benchmarks/mini_clip_table.py [--readme README.md] [--methods task_arithmetic ...]
(``--fast-dev-run``: one batch of 25 test images per task, a smoke run whose table says so.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from fusion_bench.data.mini_tasks import BENCHMARK_TASKS, mini_path
from fusion_bench.utils.io import atomic_write, atomic_write_json

SKIP = {
    "dummy": "the pre-trained row",
    "clip_finetune": "trains an expert",
    "image_classification_finetune": "trains a ViT/ResNet classifier",
    "task_vector_cos_similarity": "an analysis, returns the pre-trained model",
}
MULTITASK = ("clip_multitask_finetune",)  # trains one model on all tasks (traditional MTL): the experts' recipe
TEST_TIME_WORDS = ("adamerging", "wemoe", "weight_ensembling", "rankone", "surgery", "concrete")
TRAINING_WORDS = (*TEST_TIME_WORDS, "pwe_moe")  # the methods that train: rows only with --test-time-steps
DATA_WORDS = ("fisher", "regmean")
MARK_START, MARK_END = "<!-- mini-clip-table:start -->", "<!-- mini-clip-table:end -->"
POOLS = {"merge": "CLIPVisionModelPool/mini-clip_TA8", "single": "CLIPVisionModelPool/mini-clip_individual"}
TASKPOOL = "CLIPVisionModelTaskPool/mini-clip_TA8"


def compose(overrides: Sequence[str]) -> Any:
    """The root config with ``overrides`` (Hydra's compose API over the shipped configs)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from fusion_bench.scripts.cli import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose("fusion_bench_config", overrides=list(overrides))


FAST_DEV_RUN: list[str] = []  # under --fast-dev-run: one batch of 25 test images per task


def run(overrides: Sequence[str], report_path: Path) -> tuple[dict[str, Any], float]:
    """Run the fusion program with ``overrides``; return its report and wall time."""
    from fusion_bench.program import FabricModelFusionProgram

    cfg = compose(
        [
            *overrides,
            f"taskpool={TASKPOOL}",
            f"report_save_path={report_path}",
            f"fabric.loggers.root_dir={report_path.parent / 'logs'}",
            *FAST_DEV_RUN,
        ]
    )
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the program prints each report
        report = FabricModelFusionProgram(cfg).run()
    return report, time.perf_counter() - start


def method_configs(only: Sequence[str] | None, test_time_steps: int = 0) -> list[tuple[str, str]]:
    """``(row label, method overrides)`` for every registered method worth a row.

    Each shipped YAML of a registered method is one row (a YAML that picks its class by ``name:``
    gives one row per registered name of that class, e.g. AdaMerging's two variants); a registered
    name without a YAML runs with its defaults (``+method.name=...``). Methods in :data:`SKIP` are left
    out unless named in ``only``; test-time methods (:data:`TRAINING_WORDS`) run only with
    ``test_time_steps > 0``, for that many steps (``method.max_steps``, and the AdaMerging phase of
    Concrete layer-wise AdaMerging), and their row label says so.
    """
    from fusion_bench.method import ALGORITHMS
    from fusion_bench.scripts.cli import config_choices
    from fusion_bench.utils.instantiate import resolve_target

    by_class: dict[type, list[tuple[str, str]]] = {}
    by_name: dict[str, str] = {}  # registered name -> the YAML selecting it by `name:`
    by_module: dict[str, str] = {}  # module -> such a YAML, for its other names (switched by method.name=)
    for choice in config_choices("method"):
        cfg = compose([f"method={choice}"]).method
        if cfg.get("_target_"):
            by_class.setdefault(resolve_target(cfg["_target_"], what=choice), []).append((choice, f"method={choice}"))
        elif cfg.get("name") in ALGORITHMS:
            by_name[cfg["name"]] = choice
            by_module.setdefault(ALGORITHMS.get(cfg["name"]).__module__, choice)
    rows = []
    for name in ALGORITHMS.names():
        trains = any(w in name for w in TRAINING_WORDS)
        wanted = name in (only or ()) or (only is None and name not in SKIP and (not trains or test_time_steps > 0))
        if not wanted:
            continue
        cls = ALGORITHMS.get(name)
        named = []
        if name in by_name:
            label = by_name[name] if name in by_name[name] else f"{by_name[name]} ({name})"
            named = [(label, f"method={by_name[name]}")]
        elif cls.__module__ in by_module:
            choice = by_module[cls.__module__]
            named = [(f"{choice} ({name})", f"method={choice} method.name={name}")]
        choices = by_class.get(cls) or named or [(name, f"method=dummy method._target_=null +method.name={name}")]
        if name in MULTITASK:  # one MTL row (full fine-tuning); its LoRA / L-LoRA configs only when named
            choices = [c for c in choices if c[0] == name] or choices
        for label, override in dict.fromkeys(choices):
            if trains and test_time_steps > 0:
                steps_option = "num_steps" if "pwe_moe" in override else "max_steps"  # PWE-MoE: the reference's name
                steps = f" method.{steps_option}={test_time_steps}"
                if "layer_wise_adamerging" in override and "concrete" in override:
                    steps += f" method.max_adamerging_steps={test_time_steps}"
                if "surgery" in override:
                    steps += f" method.surgery_steps={test_time_steps}"
                label, override = f"{label}, {test_time_steps} steps", override + steps
            if name in MULTITASK:
                label, override = f"{label}, {multitask_steps()}", override + " " + multitask_overrides()
            rows.append((label, override))
    return list(dict.fromkeys(rows))


def multitask_overrides() -> str:
    """Traditional MTL trains like the mini benchmark's experts: their steps, learning rate and (per task) batch."""
    from fusion_bench.scripts.build_mini_clip_v2 import MiniClipRecipeV2

    r = MiniClipRecipeV2()
    return (
        f"method.num_steps={r.finetune_steps} method.batch_size={r.finetune_batch_size} "
        f"method.learning_rate={r.finetune_learning_rate} method.lr_scheduler=fixed"
    )


def multitask_steps() -> str:
    """The MTL row's label suffix."""
    from fusion_bench.scripts.build_mini_clip_v2 import MiniClipRecipeV2

    r = MiniClipRecipeV2()
    return f"{r.finetune_steps} steps x {r.finetune_batch_size} images per task"


def individual_rows(reports_dir: Path) -> dict[str, tuple[dict[str, Any], float]]:
    """The pre-trained model and each expert, evaluated on all tasks (the 9×8 matrix)."""
    rows = {}
    for name in ["clip-mini", *(f"clip-mini_{t}" for t in BENCHMARK_TASKS)]:
        path = mini_path(f"models/{name}")
        overrides = [
            "method=dummy",
            f"modelpool={POOLS['single']}",
            f"modelpool.models._pretrained_.pretrained_model_name_or_path={path}",
        ]
        rows[name] = run(overrides, reports_dir / f"{name}.json")
        print(
            f"  {name}: average {100 * rows[name][0]['average']['accuracy']:.1f} ({rows[name][1]:.0f}s)",
            file=sys.stderr,
        )
    return rows


def merge_rows(
    reports_dir: Path, only: Sequence[str] | None, test_time_steps: int = 0
) -> dict[str, tuple[dict[str, Any], float] | str]:
    """Each method's report (or the error it raised), by row label."""
    rows: dict[str, tuple[dict[str, Any], float] | str] = {}
    for label, override in method_configs(only, test_time_steps):
        try:
            rows[label] = run(
                [*override.split(" "), f"modelpool={POOLS['merge']}"],
                reports_dir / f"method_{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.json",
            )
            print(
                f"  {label}: average {100 * rows[label][0]['average']['accuracy']:.1f} ({rows[label][1]:.0f}s)",
                file=sys.stderr,
            )
        except Exception as err:  # a method under construction must not stop the table
            rows[label] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            print(f"  {label}: failed: {rows[label]}", file=sys.stderr)
    return rows


def _cells(report: dict[str, Any]) -> str:
    accs = [f"{100 * report[t]['accuracy']:.1f}" for t in BENCHMARK_TASKS]
    return " | ".join(accs) + f" | **{100 * report['average']['accuracy']:.1f}**"


GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("task known at inference (one model per task)", ("emr_merging", "tall_mask")),
    ("output ensembles (every expert runs; not merges)", ("ensemble", "max_model_predictor")),
    ("with training data (256 images per task)", DATA_WORDS),
    ("test-time adaptation (unlabelled test images)", TEST_TIME_WORDS),
    ("Pareto-set learning (labelled train batches; the model at equal preferences)", ("pwe_moe",)),
    ("continual (the pool's order shuffled by the run's seed) and upscaling", ("opcm", "smile")),
    ("multi-task training (all eight train sets jointly)", MULTITASK),
)
"""Row groups after the data-free rows, in table order: a label goes to the first group one of whose words it
contains (the data-free group takes the rest)."""


def _grouped(labels: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Row labels by kind of method (data-free first, then :data:`GROUPS`), each group sorted."""

    def kind(label: str) -> int:
        return next((i + 1 for i, (_, words) in enumerate(GROUPS) if any(w in label for w in words)), 0)

    names = ("data-free", *(name for name, _ in GROUPS))
    groups = [(name, sorted(label for label in labels if kind(label) == i)) for i, name in enumerate(names)]
    return [(name, members) for name, members in groups if members]


def markdown(individual: dict[str, tuple[dict, float]], merged: dict[str, Any]) -> str:
    """The results as Markdown: the methods table, then the 9×8 matrix and notes."""
    header = "| | " + " | ".join(BENCHMARK_TASKS) + " | avg |\n|---|" + "---:|" * (len(BENCHMARK_TASKS) + 1) + "\n"
    own = {t: individual[f"clip-mini_{t}"][0][t]["accuracy"] for t in BENCHMARK_TASKS}
    own_avg = sum(own.values()) / len(own)
    lines = [
        header.rstrip("\n"),
        f"| Pre-trained | {_cells(individual['clip-mini'][0])} |",
        "| Fine-tuned (each expert on its own task) | "
        + " | ".join(f"{100 * own[t]:.1f}" for t in BENCHMARK_TASKS)
        + f" | **{100 * own_avg:.1f}** |",
    ]
    failed = [f"- `{label}`: {row}" for label, row in merged.items() if isinstance(row, str)]
    for group, labels in _grouped([label for label, row in merged.items() if not isinstance(row, str)]):
        lines.append(f"| *{group}* |" + " |" * (len(BENCHMARK_TASKS) + 1))
        lines += [f"| `{label}` ({merged[label][1]:.0f} s) | {_cells(merged[label][0])} |" for label in labels]
    matrix = [header.rstrip("\n")] + [f"| `{name}` | {_cells(rep)} |" for name, (rep, _) in individual.items()]
    scope = (
        "**fast_dev_run: one batch of 25 test images per task, not the benchmark's numbers.**"
        if FAST_DEV_RUN
        else "Accuracy (%) on the test splits (500 images per task)."
    )
    parts = [
        scope,
        "",
        *lines,
        "",
        "Every model on every task (rows: the pre-trained model and the eight experts):",
        "",
        *matrix,
    ]
    if failed:
        parts += ["", "Methods that failed on this run:", "", *failed]
    return "\n".join(parts) + "\n"


def replace_block(path: Path, block: str, start: str = MARK_START, end: str = MARK_END) -> None:
    """Put ``block`` between the markers ``start``/``end`` in ``path`` (appending them if absent)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    new = f"{start}\n{block}{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S)
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + new + "\n"
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--doc", default="docs/mini_clip_benchmark.md", help="Markdown file to update")
    parser.add_argument("--readme", default=None, help="also update this README's table block")
    parser.add_argument("--reports", default="outputs/mini_clip_table", help="folder for the runs' JSON reports")
    parser.add_argument(
        "--methods", nargs="*", default=None, help="registered method names to run (default: all but SKIP)"
    )
    parser.add_argument(
        "--test-time-steps",
        type=int,
        default=0,
        help="also run the test-time methods (AdaMerging, Concrete, WEMoE, RankOne-MoE) for this many steps",
    )
    parser.add_argument(
        "--fast-dev-run", action="store_true", help="one batch of 25 test images per task (a smoke run)"
    )
    args = parser.parse_args(argv)
    FAST_DEV_RUN[:] = (
        ["taskpool.fast_dev_run=true", "taskpool.dataloader_kwargs.batch_size=25"] if args.fast_dev_run else []
    )
    from fusion_bench.example import register_resolvers

    register_resolvers()
    reports, start = Path(args.reports), time.perf_counter()
    print("individual models:", file=sys.stderr)
    individual = individual_rows(reports)
    print("merging methods:", file=sys.stderr)
    merged = merge_rows(reports, args.methods, args.test_time_steps)
    table = markdown(individual, merged)
    total = time.perf_counter() - start
    atomic_write_json(reports / "summary.json", {"seconds": round(total, 1), "markdown": table})
    options = "".join(
        [
            f" --test-time-steps {args.test_time_steps}" if args.test_time_steps else "",
            f" --methods {' '.join(args.methods)}" if args.methods is not None else "",
            " --fast-dev-run" if args.fast_dev_run else "",
        ]
    )
    block = table + f"\nRegenerated with `python benchmarks/mini_clip_table.py{options}` in {total / 60:.1f} min.\n"
    for path in filter(None, [args.doc, args.readme]):
        replace_block(Path(path), block)
    print(block)


if __name__ == "__main__":
    main()
