"""Benchmark: pure start-up, ``fusion_bench method=dummy taskpool=dummy`` on the built-in tiny CLIP (24k parameters).

Whole processes, measured from exec to exit (wall) with the kernel's peak RSS; the median of
``--repeat`` runs of each, interleaved (ours, [before,] reference, ours, ...) so load on the machine
hits every variant alike. Prints ours, the reference (fusion-bench 0.2.33, see ``_runner.py``) and
their ratio; with ``--before SRC`` also the same command on another source tree.

Targets (issue 18): ours <= 2.0 s and <= 0.5 GB peak.

    python benchmarks/startup.py [--repeat 3] [--before /path/to/old/checkout]
"""

from __future__ import annotations

import argparse
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


def tiny_model(root: Path) -> Path:
    """The built-in tiny example's pre-trained CLIP, built under ``root`` (seconds, once)."""
    sys.path.insert(0, str(REPO))
    from fusion_bench.testing import build_tiny_example

    return build_tiny_example(root).base_model


def ours_command(model: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fusion_bench",
        "method=dummy",
        "modelpool=CLIPVisionModelPool/tiny-clip_example_individual",
        f"modelpool.models._pretrained_.pretrained_model_name_or_path={model}",
        f"modelpool.processor.pretrained_model_name_or_path={model}",
        "taskpool=dummy",
        "report_save_path=false",
    ]


def reference_command(python: Path, model: Path) -> list[str]:
    return [
        str(python),
        "-m",
        "fusion_bench.scripts.cli",
        "method=dummy",
        "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_individual",
        f"modelpool.models._pretrained_={model}",
        f"modelpool.processor={model}",
        "taskpool=dummy",
    ]


def median(runs: list[Measured]) -> Measured:
    for run in runs:
        if run.returncode != 0:
            raise SystemExit(f"a run failed (exit {run.returncode}):\n{run.stderr_tail}")
    wall = statistics.median(r.wall_s for r in runs)
    peak = int(statistics.median(r.peak_rss for r in runs))
    return Measured(wall, peak, 0, "", statistics.median(r.cpu_s for r in runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another source tree to time the same way (before/after)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fb-startup-") as tmp:
        work = Path(tmp)
        model = tiny_model(work / "example")
        env = ours_env(REPO, FUSION_BENCH_CACHE_DIR=str(work / "cache"), OMP_NUM_THREADS="1")
        variants = {"ours": (ours_command(model), env)}
        if args.before is not None:
            variants["before"] = (ours_command(model), dict(env, PYTHONPATH=str(args.before)))
        ref = reference_python()
        if ref is not None:
            variants["reference"] = (reference_command(ref, model), dict(env, PYTHONPATH=""))
        measure(*variants["ours"][:1], env=env, cwd=work)  # warm the file cache and the bytecode once
        runs: dict[str, list[Measured]] = {k: [] for k in variants}
        for _ in range(args.repeat):
            for name, (argv, variant_env) in variants.items():
                runs[name].append(measure(argv, env=variant_env, cwd=work))
        result = {name: median(r) for name, r in runs.items()}
    print(f"start-up: method=dummy taskpool=dummy, tiny CLIP, median of {args.repeat}")
    for name, m in result.items():
        print(m.line(name))
    if "reference" in result:
        ours, reference = result["ours"], result["reference"]
        print(
            f"ours / reference: wall {ratio(ours.wall_s, reference.wall_s)}, CPU {ratio(ours.cpu_s, reference.cpu_s)}, "
            f"RSS {ratio(ours.peak_rss, reference.peak_rss)}"
        )
    else:
        print(reference_skip_message())
    if "before" in result:
        ours, before = result["ours"], result["before"]
        print(f"ours / before: wall {ratio(ours.wall_s, before.wall_s)}, CPU {ratio(ours.cpu_s, before.cpu_s)}")
    ours = result["ours"]
    print(
        f"target wall <= 2.0 s: {'met' if ours.wall_s <= 2.0 else 'NOT met'} ({ours.wall_s:.2f} s); "
        f"target peak <= 0.5 GB: {'met' if ours.peak_rss <= 0.5 * 2**30 else 'NOT met'} ({ours.peak_rss / 2**30:.2f} GB)"
    )


if __name__ == "__main__":
    main()
