"""Generalization and robustness tables of the built-in offline benchmark (mini CLIP, generated tasks).

Runs, through the fusion program (the code path of the ``fusion_bench`` command, in one process):

* generalization: for ``exp1`` and ``exp2``, each method on ``modelpool=CLIPVisionModelPool/mini-clip_generalization_<exp>``
  (the six seen tasks' experts) with ``taskpool=CLIPVisionModelTaskPool/mini-clip_generalization_<exp>``
  (all eight tasks; the report's ``seen`` / ``unseen`` means);
* robustness: each method with ``--config-name mini-clip_robustness_clean`` and with
  ``--config-name mini-clip_robustness_corrupted corruption=<c> severity=<s>`` for the seven corruptions;

where the methods are ``dummy`` (the pre-trained model, as reference), ``simple_average``,
``task_arithmetic`` and ``ties_merging`` with their shipped configs (``--methods`` changes the list).
Writes the Markdown tables into ``docs/generalization_robustness.md`` between the markers
``<!-- generalization-robustness-table:start -->`` / ``end``, and every run's JSON report under
``--reports``. Run from the repository root:
    python benchmarks/generalization_robustness_table.py [--severity 5] [--methods task_arithmetic ...]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mini_clip_table import replace_block  # noqa: E402  (the table-block writer shared by the benchmark scripts)

from fusion_bench.data.corruptions import CORRUPTIONS  # noqa: E402
from fusion_bench.utils.io import atomic_write_json  # noqa: E402

METHODS = {
    "dummy": "Pre-trained",
    "simple_average": "Simple average",
    "task_arithmetic": "Task arithmetic",
    "ties_merging": "TIES-merging",
}
EXPERIMENTS = ("exp1", "exp2")
MARKS = ("<!-- generalization-robustness-table:start -->", "<!-- generalization-robustness-table:end -->")


def run(config_name: str, overrides: Sequence[str], report_path: Path) -> dict[str, Any]:
    """Compose ``config_name`` with ``overrides``, run the fusion program, return its report."""
    from hydra import compose, initialize_config_dir

    from fusion_bench.program import FabricModelFusionProgram
    from fusion_bench.scripts.cli import CONFIG_DIR

    overrides = [
        *overrides,
        f"report_save_path={report_path}",
        f"fabric.loggers.root_dir={report_path.parent / 'logs'}",
    ]
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the program prints each report
        report = FabricModelFusionProgram(cfg).run()
    print(
        f"  {report_path.stem}: {100 * report['average']['accuracy']:.1f} ({time.perf_counter() - start:.0f} s)",
        file=sys.stderr,
    )
    return report


def generalization_runs(methods: Sequence[str], reports: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{exp: {method: report}}``."""
    return {
        exp: {
            m: run(
                "fusion_bench_config",
                [
                    f"method={m}",
                    f"modelpool=CLIPVisionModelPool/mini-clip_generalization_{exp}",
                    f"taskpool=CLIPVisionModelTaskPool/mini-clip_generalization_{exp}",
                ],
                reports / f"generalization_{exp}_{m}.json",
            )
            for m in methods
        }
        for exp in EXPERIMENTS
    }


def robustness_runs(methods: Sequence[str], severity: int, reports: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{method: {"clean" | corruption: report}}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for m in methods:
        out[m] = {"clean": run("mini-clip_robustness_clean", [f"method={m}"], reports / f"robustness_clean_{m}.json")}
        for c in CORRUPTIONS:
            out[m][c] = run(
                "mini-clip_robustness_corrupted",
                [f"method={m}", f"corruption={c}", f"severity={severity}"],
                reports / f"robustness_{c}_s{severity}_{m}.json",
            )
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def generalization_table(exp: str, rows: dict[str, dict[str, Any]]) -> str:
    """One experiment: the seen tasks, their mean, the unseen tasks, their mean, the overall average."""
    groups = next(iter(rows.values()))["meta"]["task_groups"]
    seen, unseen = groups["seen"], groups["unseen"]
    head = ["method", *seen, "**seen avg**", *unseen, "**unseen avg**", "avg (8)"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for m, r in rows.items():
        cells = [
            *(_pct(r[t]["accuracy"]) for t in seen),
            f"**{_pct(r['seen']['accuracy'])}**",
            *(_pct(r[t]["accuracy"]) for t in unseen),
            f"**{_pct(r['unseen']['accuracy'])}**",
            _pct(r["average"]["accuracy"]),
        ]
        lines.append(f"| {METHODS.get(m, m)} | " + " | ".join(cells) + " |")
    return f"**Generalization {exp}** (experts of the seen tasks merged; accuracy %):\n\n" + "\n".join(lines) + "\n"


def robustness_tables(rows: dict[str, dict[str, dict[str, Any]]], severity: int) -> str:
    """The average over the four tasks per corruption, then per task and corruption for each method."""
    columns = ["clean", *CORRUPTIONS]
    head = "| method | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns)
    lines = [head] + [
        f"| {METHODS.get(m, m)} | " + " | ".join(_pct(r[c]["average"]["accuracy"]) for c in columns) + " |"
        for m, r in rows.items()
    ]
    parts = [
        f"**Robustness** (severity {severity}, CIFAR-10-C parameters; mean accuracy % over the four tasks):\n",
        "\n".join(lines),
        "",
    ]
    tasks = [t for t in next(iter(rows.values()))["clean"] if t not in ("model_info", "average", "meta")]
    for m, r in rows.items():
        per_task = [f"| {t} | " + " | ".join(_pct(r[c][t]["accuracy"]) for c in columns) + " |" for t in tasks]
        parts += [f"{METHODS.get(m, m)}, per task:\n", head.replace("method", "task"), *per_task, ""]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--doc", default="docs/generalization_robustness.md", help="Markdown file to update")
    parser.add_argument("--reports", default="outputs/generalization_robustness", help="folder for the JSON reports")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="method configs to run")
    parser.add_argument("--severity", type=int, default=5, help="corruption severity (1-5)")
    args = parser.parse_args(argv)
    from fusion_bench.example import register_resolvers

    register_resolvers()
    reports, start = Path(args.reports), time.perf_counter()
    print("generalization:", file=sys.stderr)
    general = generalization_runs(args.methods, reports)
    print("robustness:", file=sys.stderr)
    robust = robustness_runs(args.methods, args.severity, reports)
    minutes = (time.perf_counter() - start) / 60
    sizes = sorted(
        {
            n
            for r in (*general["exp1"].values(), *robust[args.methods[0]].values())
            for n in r["meta"]["num_samples"].values()
        }
    )
    block = "\n".join(
        [
            *(generalization_table(e, general[e]) for e in EXPERIMENTS),
            robustness_tables(robust, args.severity),
            f"Regenerated with `python benchmarks/generalization_robustness_table.py --severity {args.severity}` "
            f"in {minutes:.1f} min (test images per task: {', '.join(map(str, sizes))}).\n",
        ]
    )
    atomic_write_json(reports / "summary.json", {"minutes": round(minutes, 2), "markdown": block})
    replace_block(Path(args.doc), block, *MARKS)
    print(block)


if __name__ == "__main__":
    main()
