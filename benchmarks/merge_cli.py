"""Benchmark: task arithmetic and TIES through the command line, 8 + 1 CLIP ViT-B/32-size encoders, save included.

Builds the pre-trained encoder and eight perturbed copies (random weights of the ViT-B/32 vision
encoder's shape, ~88M parameters, float32 safetensors; see ``merge_streaming.py``), then runs each
method as a whole ``fusion_bench`` process (start-up, merge, saving the merged model) for ours
and for the reference (fusion-bench 0.2.33, see ``_runner.py``), interleaved, and prints wall
time, peak RSS and the ratios. With ``--before SRC`` the same commands also run on another source
tree (before/after).

Targets (issue 18): task arithmetic <= 0.35x the reference's wall; TIES <= 0.30x the reference's
wall and <= 2.5x our own task arithmetic.

    python benchmarks/merge_cli.py [--models 8] [--repeat 1] [--before SRC] [--small]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _runner import (  # noqa: E402
    REPO,
    Measured,
    measure,
    ours_env,
    ratio,
    reference_python,
    reference_skip_message,
)
from merge_streaming import build_checkpoints  # noqa: E402

TASKS = ("sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
METHODS = ("task_arithmetic", "ties_merging")


def ours_command(method: str, dirs: list[Path], out: Path) -> list[str]:
    models = [f"modelpool.models._pretrained_.pretrained_model_name_or_path={dirs[0]}"]
    models += [f"modelpool.models.{t}.pretrained_model_name_or_path={d}" for t, d in zip(TASKS, dirs[1:])]
    models += [f"~modelpool.models.{t}" for t in TASKS[len(dirs) - 1 :]]
    return [
        sys.executable,
        "-m",
        "fusion_bench",
        f"method={method}",
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only",
        *models,
        f"modelpool.processor.pretrained_model_name_or_path={dirs[0]}",
        "taskpool=dummy",
        "report_save_path=false",
        f"merged_model_save_path={out}",
        "checkpoint_hash=false",
    ]


def reference_command(python: Path, method: str, dirs: list[Path], out: Path) -> list[str]:
    names = ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
    models = [f"modelpool.models._pretrained_={dirs[0]}"]
    models += [f"modelpool.models.{t}={d}" for t, d in zip(names, dirs[1:])]
    models += [f"~modelpool.models.{t}" for t in names[len(dirs) - 1 :]]
    return [
        str(python),
        "-m",
        "fusion_bench.scripts.cli",
        f"method={method}",
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only",
        *models,
        f"modelpool.processor={dirs[0]}",
        "taskpool=dummy",
        f"merged_model_save_path={out}",
    ]


def same_bits(a: Path, b: Path) -> bool:
    """Whether the two saved models hold the same tensors, bit for bit (safetensors files)."""
    import torch
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ta, tb = tensors(a), tensors(b)
    return (
        bool(ta)
        and ta.keys() == tb.keys()
        and all(
            ta[k].dtype == tb[k].dtype
            and ta[k].shape == tb[k].shape
            and torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8))
            for k in ta
        )
    )


REFERENCE_TIES_GIB_PER_MODEL = 2.75  # the reference's TIES held ~22 GB for 8 + 1 ViT-B/32-size models (issue 18)


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def reference_fits(method: str, args: argparse.Namespace) -> bool:
    """Whether the reference's run of ``method`` fits in the memory available now (its TIES holds every
    model's flattened task vector at once); prints why not."""
    if method != "ties_merging" or args.small:
        return True
    need, have = REFERENCE_TIES_GIB_PER_MODEL * args.models, available_gib()
    if need <= have * 0.9:
        return True
    print(f"reference ties_merging: skipped (needs ~{need:.0f} GiB, {have:.0f} GiB available)", flush=True)
    return False


def checked(run: Measured, label: str) -> Measured:
    if run.returncode != 0:
        raise SystemExit(f"{label} failed (exit {run.returncode}):\n{run.stderr_tail}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=8, choices=range(1, 9), metavar="N<=8")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--before", type=Path, help="another source tree to time the same way (before/after)")
    parser.add_argument("--small", action="store_true", help="a 4-layer, 192-wide encoder (quick check)")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory(prefix="fb-merge-cli-") as tmp:
        work = Path(tmp)
        sys.path.insert(0, str(REPO))
        dirs = build_checkpoints(work / "models", args.models, args.small)
        env = ours_env(REPO, FUSION_BENCH_CACHE_DIR=str(work / "cache"))
        ref = reference_python()
        runs: dict[tuple[str, str], list[Measured]] = {}
        same: dict[str, bool] = {}
        for _ in range(args.repeat):
            for method in methods:
                outs = {name: work / f"merged_{name}" for name in ("ours", "before", "reference")}
                variants = {"ours": (ours_command(method, dirs, outs["ours"]), env)}
                if args.before is not None:
                    before_env = dict(env, PYTHONPATH=str(args.before))
                    variants["before"] = (ours_command(method, dirs, outs["before"]), before_env)
                if ref is not None and reference_fits(method, args):
                    variants["reference"] = (
                        reference_command(ref, method, dirs, outs["reference"]),
                        dict(env, PYTHONPATH=""),
                    )
                for name, (argv, variant_env) in variants.items():
                    shutil.rmtree(outs[name], ignore_errors=True)
                    run = checked(measure(argv, env=variant_env, cwd=work), f"{name} {method}")
                    runs.setdefault((name, method), []).append(run)
                if "before" in variants:
                    same[method] = same_bits(outs["ours"], outs["before"])
    result = {
        k: Measured(
            statistics.median(r.wall_s for r in v),
            int(statistics.median(r.peak_rss for r in v)),
            0,
            "",
            statistics.median(r.cpu_s for r in v),
        )
        for k, v in runs.items()
    }
    size = "4-layer 192-wide" if args.small else "ViT-B/32-size"
    print(f"merge through the CLI: 1 + {args.models} {size} encoders, save included, median of {args.repeat}")
    for (name, method), m in result.items():
        print(m.line(f"{method} {name}"))
    for method in methods:
        ours = result[("ours", method)]
        if ("reference", method) in result:
            ref_m = result[("reference", method)]
            print(
                f"{method}: ours / reference wall {ratio(ours.wall_s, ref_m.wall_s)}, "
                f"CPU {ratio(ours.cpu_s, ref_m.cpu_s)}, RSS {ratio(ours.peak_rss, ref_m.peak_rss)}"
            )
        if ("before", method) in result:
            before = result[("before", method)]
            print(
                f"{method}: ours / before wall {ratio(ours.wall_s, before.wall_s)}, CPU {ratio(ours.cpu_s, before.cpu_s)}"
            )
    for method, equal in same.items():
        print(f"{method}: merged model ours vs before: {'same bits' if equal else 'DIFFERENT bits'}")
    if ref is None:
        print(reference_skip_message())
    if ("ours", "ties_merging") in result and ("ours", "task_arithmetic") in result:
        ties, ta = result[("ours", "ties_merging")], result[("ours", "task_arithmetic")]
        print(
            f"ours: TIES / task arithmetic wall {ratio(ties.wall_s, ta.wall_s)}, CPU {ratio(ties.cpu_s, ta.cpu_s)} "
            "(target <= 2.5)"
        )


if __name__ == "__main__":
    main()
