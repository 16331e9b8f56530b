"""Full fine-tuning vs LoRA vs L-LoRA experts, alone and merged (the published comparison), offline.

For each variant (``full``: ``method=clip_finetune``; ``lora``: ``clip_finetune_lora``; ``l_lora``:
``clip_finetune_l_lora``) and each task of the pool, fine-tune an expert from the pool's
``_pretrained_`` model with the same optimiser (Adam), fixed learning rate, steps and batch size (saved under
``--out``; an existing expert is reused unless ``--retrain``). Then evaluate, through the fusion
program (the code path of the ``fusion_bench`` command):

* each expert on its own task;
* ``task_arithmetic`` (λ = 0.3) and ``simple_average`` over the variant's experts, on every task
  (LoRA / L-LoRA experts through ``CLIPVisionLoRAModelPool``, which folds each adapter into weights);

and write the Markdown tables to ``--doc`` (default ``docs/lora_comparison.md``, between the
markers ``<!-- lora-comparison:start -->`` / ``end``). Defaults target the built-in offline
benchmark (mini CLIP, its eight shipped tasks; its models must exist): ``--steps``, ``--batch-size``
and ``--learning-rate`` default to the recipe of its shipped experts
(:class:`~fusion_bench.scripts.build_mini_clip_v2.MiniClipRecipeV2`: 400 steps of batch 32 at lr 1e-4),
for every variant alike. Run from the repository root::

    python benchmarks/lora_comparison.py --steps 400 --batch-size 32 --learning-rate 1e-4 --out /tmp/lora
    python benchmarks/lora_comparison.py --modelpool CLIPVisionModelPool/tiny-clip_example \\
        --taskpool CLIPVisionModelTaskPool/tiny-clip_example --steps 20 --doc outputs/tiny.md   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from mini_clip_table import compose, replace_block  # the sibling script (benchmarks/ is on sys.path)
from omegaconf import open_dict

from fusion_bench.scripts.build_mini_clip_v2 import MiniClipRecipeV2
from fusion_bench.utils.io import atomic_write_json

VARIANTS = {"full": "clip_finetune", "lora": "clip_finetune_lora", "l_lora": "clip_finetune_l_lora"}
MERGES = {
    "task_arithmetic": ["method=task_arithmetic", "method.scaling_factor=0.3"],
    "simple_average": ["method=simple_average"],
}
DEFAULT_MODELPOOL = "CLIPVisionModelPool/mini-clip_TA8"  # the shipped benchmark
RECIPE = MiniClipRecipeV2()  # the shipped experts' fine-tuning settings: the defaults
MARK_START, MARK_END = "<!-- lora-comparison:start -->", "<!-- lora-comparison:end -->"


def run_program(cfg: Any) -> tuple[dict[str, Any], float]:
    """Run the fusion program on ``cfg``; return its report and wall time."""
    from fusion_bench.program import FabricModelFusionProgram

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the program prints each report
        report = FabricModelFusionProgram(cfg).run()
    return report, time.perf_counter() - start


def finetune(args: argparse.Namespace, variant: str, task: str) -> tuple[Path, float | None, bool]:
    """Fine-tune (or reuse) the ``variant`` expert of ``task``.

    Returns:
        its folder, its training seconds (of a reused expert: from its saved report, None without
        one) and whether it was reused.
    """
    out = Path(args.out) / variant / task
    report_path = Path(args.out) / "reports" / f"finetune_{variant}_{task}.json"
    if out.exists() and not args.retrain:
        try:
            return out, float(json.loads(report_path.read_text())["meta"]["fusion_seconds"]), True
        except (OSError, ValueError, KeyError, TypeError):
            return out, None, True
    cfg = compose(
        [
            f"method={VARIANTS[variant]}",
            f"method.task={task}",
            f"method.num_steps={args.steps}",
            f"method.batch_size={args.batch_size}",
            f"method.learning_rate={args.learning_rate}",
            "method.lr_scheduler=fixed",
            f"method.seed={args.seed}",
            f"method.save_path={out}",
            f"modelpool={args.modelpool}",
            "taskpool=dummy",
            f"report_save_path={report_path}",
        ]
    )
    _, seconds = run_program(cfg)
    return out, seconds, False


def _pool_overrides(cfg: Any, variant: str, experts: dict[str, Path], tasks: Sequence[str]) -> None:
    """Point ``cfg.modelpool``'s models at the variant's experts (adapters through the LoRA pool)."""
    with open_dict(cfg):
        if variant != "full":
            cfg.modelpool._target_ = "fusion_bench.modelpool.CLIPVisionLoRAModelPool"
        base = cfg.modelpool.models["_pretrained_"]
        cfg.modelpool.models = {"_pretrained_": base}
        for task in tasks:
            entry = {"pretrained_model_name_or_path": str(experts[task])}
            cfg.modelpool.models[task] = entry if variant == "full" else {"adapter": str(experts[task]), "base": base}


def evaluate(
    args: argparse.Namespace,
    variant: str,
    experts: dict[str, Path],
    method: Sequence[str],
    tasks: Sequence[str],
    label: str,
) -> dict[str, Any]:
    """The report of ``method`` on the variant's experts for ``tasks``, evaluated on those tasks."""
    cfg = compose(
        [
            *method,
            f"modelpool={args.modelpool}",
            f"taskpool={args.taskpool}",
            f"report_save_path={Path(args.out) / 'reports' / f'{label}.json'}",
        ]
    )
    _pool_overrides(cfg, variant, experts, tasks)
    with open_dict(cfg):
        cfg.taskpool.test_datasets = {t: cfg.taskpool.test_datasets[t] for t in tasks}
    return run_program(cfg)[0]


def own_task_accuracies(
    args: argparse.Namespace, variant: str, experts: dict[str, Path], tasks: Sequence[str]
) -> dict[str, float]:
    """Each expert alone on its own task (``method=dummy`` with the expert as ``_pretrained_``)."""
    out = {}
    for task in tasks:
        cfg = compose(
            [
                "method=dummy",
                f"modelpool={args.modelpool}",
                f"taskpool={args.taskpool}",
                f"report_save_path={Path(args.out) / 'reports' / f'single_{variant}_{task}.json'}",
            ]
        )
        with open_dict(cfg):
            base = cfg.modelpool.models["_pretrained_"]
            if variant == "full":
                cfg.modelpool.models = {"_pretrained_": {"pretrained_model_name_or_path": str(experts[task])}}
            else:
                cfg.modelpool._target_ = "fusion_bench.modelpool.CLIPVisionLoRAModelPool"
                cfg.modelpool.models = {"_pretrained_": {"adapter": str(experts[task]), "base": base}}
            cfg.taskpool.test_datasets = {task: cfg.taskpool.test_datasets[task]}
        out[task] = run_program(cfg)[0][task]["accuracy"]
    return out


def trainable_parameters(folder: Path) -> int:
    """Parameters an expert trained: the whole encoder, or the adapter's factors."""
    from safetensors import safe_open

    path = folder / ("adapter_model.safetensors" if (folder / "adapter_config.json").is_file() else "model.safetensors")
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def _versus_shipped(args: argparse.Namespace) -> str:
    """How the full experts trained here relate to the shipped ones (the end of a sentence; for other pools: ".")."""
    recipe = (RECIPE.finetune_steps, RECIPE.finetune_batch_size, RECIPE.finetune_learning_rate)
    shipped = (
        f"the shipped experts of the README's table (Adam, lr {recipe[2]:g} fixed, {recipe[0]} steps of batch "
        f"{recipe[1]}, seed {RECIPE.seed})"
    )
    if args.modelpool != DEFAULT_MODELPOOL:
        return "."
    if (args.steps, args.batch_size, args.learning_rate) != recipe:
        return f", so they differ from {shipped}."
    if args.seed != RECIPE.seed:
        return f": the recipe of {shipped}, but another seed (data order), so they differ slightly from them."
    return f": the recipe and seed of {shipped}."


def markdown(
    tasks: Sequence[str],
    results: dict[str, dict[str, Any]],
    args: argparse.Namespace,
    seconds: float,
    reused_seconds: float,
    reused: int,
) -> str:
    """The comparison as Markdown."""
    header = "| variant | model | " + " | ".join(tasks) + " | avg |\n|---|---|" + "---:|" * (len(tasks) + 1)
    rows = [header]
    for variant, res in results.items():
        own = res["own"]
        rows.append(
            f"| {variant} | each expert on its own task | "
            + " | ".join(f"{100 * own[t]:.1f}" for t in tasks)
            + f" | **{100 * sum(own.values()) / len(own):.1f}** |"
        )
        for merge in MERGES:
            rep = res[merge]
            rows.append(
                f"| {variant} | {merge} | "
                + " | ".join(f"{100 * rep[t]['accuracy']:.1f}" for t in tasks)
                + f" | **{100 * rep['average']['accuracy']:.1f}** |"
            )
    params = ["| variant | trainable parameters per expert | training seconds per expert (mean) |", "|---|---:|---:|"]
    for variant, res in results.items():
        secs = [s for s in res["train_seconds"] if s is not None]
        params.append(
            f"| {variant} | {res['trainable']:,} | {sum(secs) / len(secs):.1f} |"
            if secs
            else f"| {variant} | {res['trainable']:,} | (not recorded) |"
        )
    setup = (
        f"Pool `{args.modelpool}`, task pool `{args.taskpool}`; every expert: Adam, lr {args.learning_rate:g} (fixed), "
        f"{args.steps} steps of batch {args.batch_size}, seed {args.seed}; LoRA / L-LoRA: q_proj and v_proj, r 16, "
        "alpha 32, dropout 0.1. Merges: task arithmetic λ = 0.3, simple average; adapters folded into weights "
        "(LoRA: W0 + s·B·A; L-LoRA: the linearised layer's exact weights, see `fusion_bench/models/linearized/lora.py`). "
        "The full experts are fine-tuned here with the same settings as the LoRA ones" + _versus_shipped(args)
    )
    return (
        "\n".join(
            [
                "Accuracy (%) on the test splits.",
                "",
                *rows,
                "",
                *params,
                "",
                setup,
                "",
                f"Regenerated with `python benchmarks/lora_comparison.py --steps {args.steps} --batch-size "
                f"{args.batch_size} --learning-rate {args.learning_rate:g}` in {(seconds + reused_seconds) / 60:.1f} min"
                + (
                    f" ({reused} experts reused from an earlier run, their fine-tuning times from its reports)."
                    if reused
                    else "."
                ),
            ]
        )
        + "\n"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modelpool", default=DEFAULT_MODELPOOL)
    parser.add_argument("--taskpool", default="CLIPVisionModelTaskPool/mini-clip_TA8")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--steps",
        type=int,
        default=RECIPE.finetune_steps,
        help="fine-tuning steps per expert (default: the shipped experts')",
    )
    parser.add_argument(
        "--batch-size", type=int, default=RECIPE.finetune_batch_size, help="default: the shipped experts'"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        default=RECIPE.finetune_learning_rate,
        help="Adam, fixed (default: the shipped experts')",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="outputs/lora_comparison", help="experts and reports")
    parser.add_argument("--doc", default="docs/lora_comparison.md")
    parser.add_argument("--retrain", action="store_true", help="fine-tune again even if an expert exists")
    args = parser.parse_args(argv)
    from fusion_bench.example import register_resolvers

    register_resolvers()
    start = time.perf_counter()
    tasks = list(compose([f"modelpool={args.modelpool}"]).modelpool.train_datasets)
    results: dict[str, dict[str, Any]] = {}
    reused_seconds, reused = 0.0, 0
    for variant in args.variants:
        experts, seconds = {}, []
        for task in tasks:
            experts[task], secs, was_reused = finetune(args, variant, task)
            seconds.append(secs)
            if was_reused:
                reused, reused_seconds = reused + 1, reused_seconds + (secs or 0.0)
            print(
                f"  {variant} {task}: {'reused' if was_reused else 'trained'}"
                + ("" if secs is None else f", {secs:.0f}s"),
                file=sys.stderr,
            )
        res: dict[str, Any] = {"train_seconds": seconds, "trainable": trainable_parameters(experts[tasks[0]])}
        res["own"] = own_task_accuracies(args, variant, experts, tasks)
        for merge, method in MERGES.items():
            res[merge] = evaluate(args, variant, experts, method, tasks, f"{merge}_{variant}")
            print(f"  {variant} {merge}: average {100 * res[merge]['average']['accuracy']:.1f}", file=sys.stderr)
        results[variant] = res
    table = markdown(tasks, results, args, time.perf_counter() - start, reused_seconds, reused)
    atomic_write_json(Path(args.out) / "summary.json", {"markdown": table, "results": results})
    replace_block(Path(args.doc), table, MARK_START, MARK_END)
    print(table)


if __name__ == "__main__":
    main()
