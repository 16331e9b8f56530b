"""Benchmark: test-time training steps per second, ours vs the reference (fusion-bench 0.2.33).

Workloads: layer-wise AdaMerging (``clip_layer_wise_adamerging``) and WEMoE
(``clip_weight_ensembling_moe``) on the built-in mini benchmark (``modelpool=CLIPVisionModelPool/mini-clip_TA8``:
the mini pre-trained CLIP vision encoder, its eight fine-tuned experts, the eight tasks' test splits).
Every step draws one batch of ``--batch-size`` test images per task (eight tasks), sums the prediction
entropies and makes one Adam step. Both sides use the same models, datasets, batch size, thread count
and ``num_workers=0`` (the reference's configs default to 8 and 16 DataLoader workers, which only
oversubscribe a small machine).

Each run is a separate process (ours with this checkout's interpreter, the reference with
``$FUSION_BENCH_REFERENCE_PYTHON`` or ``/work/refvenv/bin/python``), driven through the methods'
Python API; ours and the reference alternate. Only the training loop is timed: every call of
``torch.optim.Adam.step`` is stamped (wall and process CPU time); after ``--warmup`` steps the next
``--steps`` intervals between stamps are one training step each (data loading, forward, backward,
optimiser step, the merge and the loop's own bookkeeping). Start-up, model loading, zero-shot heads
and evaluation are outside the clock. The reference needs small shims, applied only inside its
process: class names and templates of the mini tasks (it knows only its own datasets) and a
fix of its WEMoE start-up (its task-arithmetic base fails its own Parameter-vs-Tensor type check, and
transformers 5's ``CLIPVisionModel`` has no ``.vision_model`` child).

Target (issue 18): ours >= 1.5x the reference's steps/s.

The default warm-up (40 steps) runs past the first epoch over the mini tasks' 500-image test splits: our
streams decode and preprocess each image once, so the first epoch is slower than the rest, and the rest
is what a 1000-step run spends nearly all its steps in (``--warmup 5`` times the first epoch instead).
With ``--before SRC`` another source tree (e.g. an export of an older commit) runs as a third side.

    python benchmarks/test_time_speed.py [--threads 1] [--steps 30] [--warmup 40] [--repeat 1] [--before SRC]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
METHODS = ("adamerging", "wemoe")
RESULT_TAG = "TEST_TIME_SPEED_RESULT "


# ---- both sides: stamping the optimiser's steps ------------------------------------------------------
def stamp_adam_steps() -> list[tuple[float, float]]:
    """Patch ``torch.optim.Adam.step`` to record ``(wall, process CPU)`` at every call; return the list."""
    import torch

    stamps: list[tuple[float, float]] = []
    original = torch.optim.Adam.step

    def step(self: Any, *args: Any, **kwargs: Any) -> Any:
        stamps.append((time.perf_counter(), time.process_time()))
        return original(self, *args, **kwargs)

    torch.optim.Adam.step = step  # type: ignore[method-assign]
    return stamps


def report(stamps: list[tuple[float, float]], warmup: int, steps: int) -> None:
    """Print the timed steps' wall and CPU seconds as one tagged JSON line (read by the parent)."""
    if len(stamps) < warmup + steps + 1:
        raise SystemExit(f"only {len(stamps)} optimiser steps were stamped; expected {warmup + steps + 1}")
    (w0, c0), (w1, c1) = stamps[warmup], stamps[warmup + steps]
    print(RESULT_TAG + json.dumps({"steps": steps, "wall_s": w1 - w0, "cpu_s": c1 - c0}), flush=True)


def cpu_fabric(workdir: str, name: str) -> Any:
    """A one-CPU Lightning Fabric with the logger each side's command line uses by default (ours: CSV,
    the reference: TensorBoard), launched."""
    import lightning
    from lightning.fabric.loggers import CSVLogger, TensorBoardLogger

    kind = CSVLogger if name == "ours" else TensorBoardLogger
    fabric = lightning.Fabric(accelerator="cpu", devices=1, loggers=[kind(root_dir=workdir, name=name)])
    fabric.launch()
    return fabric


# ---- ours ------------------------------------------------------------------------------------------
def run_ours(spec: dict[str, Any]) -> None:
    sys.path.insert(0, spec.get("source", str(REPO)))
    import torch

    torch.set_num_threads(spec["threads"])
    from hydra import compose, initialize_config_dir

    from fusion_bench.example import register_resolvers
    from fusion_bench.modelpool import MODELPOOLS
    from fusion_bench.scripts.cli import CONFIG_DIR
    from fusion_bench.utils.instantiate import instantiate_component

    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("fusion_bench_config", overrides=["modelpool=CLIPVisionModelPool/mini-clip_TA8"])
    pool = instantiate_component(cfg.modelpool, MODELPOOLS, key="_target_", what="modelpool")
    max_steps = spec["warmup"] + spec["steps"] + 1
    common = {"max_steps": max_steps, "batch_size": spec["batch_size"], "num_workers": 0, "save_interval": 10**6}
    if spec["method"] == "adamerging":
        from fusion_bench.method.test_time.adamerging import CLIPLayerWiseAdaMergingAlgorithm

        algorithm = CLIPLayerWiseAdaMergingAlgorithm(**common, resume=False)  # never resume an earlier run
    else:
        from fusion_bench.method.test_time.weight_ensembling_moe import CLIPWeightEnsemblingMoEAlgorithm

        algorithm = CLIPWeightEnsemblingMoEAlgorithm(**common)
    algorithm.fabric = cpu_fabric(spec["workdir"], "ours")
    stamps = stamp_adam_steps()
    algorithm.run(pool)
    report(stamps, spec["warmup"], spec["steps"])


# ---- the reference (runs under its own interpreter; never imports this checkout) ------------------
def patch_reference_task_text(task_text: dict[str, Any]) -> None:
    """Teach the reference the mini tasks' class names and templates (it knows only its own datasets)."""
    from fusion_bench.tasks.clip_classification import CLIPTemplateFactory

    original = CLIPTemplateFactory.get_classnames_and_templates

    def get_classnames_and_templates(dataset_name: str) -> tuple[list[str], list[Any]]:
        if dataset_name in task_text:
            text = task_text[dataset_name]
            return list(text["classnames"]), [(lambda c, t=t: t.format(c)) for t in text["templates"]]
        return original(dataset_name)

    CLIPTemplateFactory.get_classnames_and_templates = staticmethod(get_classnames_and_templates)


def patch_reference_task_arithmetic() -> None:
    """The reference's WEMoE builds its base with ``task_arithmetic_merge``, whose last ``state_dict_add`` mixes
    ``Parameter`` and ``Tensor`` values and then fails its own type check; give it plain tensors (start-up only,
    the same sums)."""
    import fusion_bench.method.task_arithmetic.task_arithmetic as ta
    from torch import nn

    original = ta.state_dict_add

    def plain(state: Any) -> Any:
        return {k: v.detach() if isinstance(v, nn.Parameter) else v for k, v in state.items()}

    ta.state_dict_add = lambda a, b, *args, **kwargs: original(plain(a), plain(b), *args, **kwargs)


def patch_reference_transformers5() -> None:
    """transformers 5's ``CLIPVisionModel`` is the vision transformer itself (no ``.vision_model`` child), which
    the reference's WEMoE reaches for; let ``.vision_model`` name the model itself."""
    from transformers import CLIPVisionModel

    if not hasattr(CLIPVisionModel, "vision_model") and "vision_model" not in CLIPVisionModel.__dict__:
        CLIPVisionModel.vision_model = property(lambda self: self)


def run_reference(spec: dict[str, Any]) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    from omegaconf import OmegaConf

    from fusion_bench.modelpool import CLIPVisionModelPool

    patch_reference_task_text(spec["task_text"])
    patch_reference_task_arithmetic()
    patch_reference_transformers5()
    models = {"_pretrained_": spec["pretrained"], **spec["models"]}
    datasets = {
        task: {"_target_": "datasets.load_from_disk", "dataset_path": path} for task, path in spec["datasets"].items()
    }
    pool = CLIPVisionModelPool(
        OmegaConf.create(models), processor=spec["pretrained"], test_datasets=OmegaConf.create(datasets)
    )
    max_steps = spec["warmup"] + spec["steps"] + 1
    common = {
        "max_steps": max_steps,
        "batch_size": spec["batch_size"],
        "num_workers": 0,
        "lr": 1e-3,
        "optimizer": "adam",
        "devices": 1,
        "fast_dev_run": False,
        "cache_dir": spec["workdir"],
    }
    if spec["method"] == "adamerging":
        from fusion_bench.method.adamerging.clip_layer_wise_adamerging import CLIPLayerWiseAdaMergingAlgorithm

        config = {
            **common,
            "name": "clip_layer_wise_adamerging",
            "weights": None,
            "init_values": 0.3,
            "clamp_weights": False,
            "tie_weights": True,
            "strict": False,
            "save_merging_weights": False,
        }
        algorithm = CLIPLayerWiseAdaMergingAlgorithm(OmegaConf.create(config))
    else:
        from fusion_bench.method.we_moe.clip_we_moe import CLIPWeightEnsemblingMoEAlgorithm

        config = {
            **common,
            "lr": 1e-4,
            "name": "clip_weight_ensembling_moe",
            "checkpoint": False,
            "save_checkpoint": False,
            "router_hidden_layers": 2,
            "init_lambda": 0.3,
            "batch_reduce": True,
            "use_grad_accumulate": True,
        }
        algorithm = CLIPWeightEnsemblingMoEAlgorithm(OmegaConf.create(config))
    algorithm.fabric = algorithm._fabric = cpu_fabric(spec["workdir"], "reference")
    stamps = stamp_adam_steps()
    algorithm.run(pool)
    report(stamps, spec["warmup"], spec["steps"])


# ---- the parent ------------------------------------------------------------------------------------
def mini_benchmark_spec() -> dict[str, Any]:
    """Local paths of the mini benchmark's models and test splits (built on first use), and its task text."""
    sys.path.insert(0, str(REPO))
    from fusion_bench.data.mini_tasks import BENCHMARK_TASKS, mini_clip_dir, mini_path
    from fusion_bench.data.task_text import task_classnames_and_templates

    models = {t: str(mini_clip_dir() / f"clip-mini_{t}") for t in BENCHMARK_TASKS}
    datasets = {t: str(Path(mini_path(f"datasets/{t}")) / "test") for t in BENCHMARK_TASKS}
    text = {}
    for t in BENCHMARK_TASKS:
        classnames, templates = task_classnames_and_templates(t)
        text[t] = {"classnames": list(classnames), "templates": list(templates)}
    return {"pretrained": str(mini_clip_dir() / "clip-mini"), "models": models, "datasets": datasets, "task_text": text}


def run_worker(python: str, side: str, spec: dict[str, Any], env: dict[str, str]) -> dict[str, float]:
    """One timed process; its tagged result line, or exit with the end of its output."""
    argv = [python, str(Path(__file__).resolve()), "--worker", side, "--spec", json.dumps(spec)]
    proc = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, cwd=spec["workdir"])
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise SystemExit(f"{side} {spec['method']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--warmup", type=int, default=40, help="untimed steps first (40: past the first epoch of the 500-image splits)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side (median reported)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--before", type=Path, help="another source tree to time as ours (before/after)")
    parser.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        spec = json.loads(args.spec)
        (run_ours if args.worker == "ours" else run_reference)(spec)
        return

    sys.path.insert(0, str(HERE))
    import tempfile

    from _runner import reference_python, reference_skip_message

    threads = str(args.threads)
    base_env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
    )
    ref = reference_python()
    mini = mini_benchmark_spec()
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fb-test-time-speed-") as tmp:
        for _ in range(args.repeat):
            for method in args.methods.split(","):
                spec = {
                    **mini,
                    "method": method,
                    "threads": args.threads,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "batch_size": args.batch_size,
                    "workdir": tmp,
                }
                sides = {"ours": (sys.executable, dict(base_env, PYTHONPATH=str(REPO)), REPO)}
                if args.before is not None:
                    before = args.before.resolve()
                    sides["before"] = (sys.executable, dict(base_env, PYTHONPATH=str(before)), before)
                if ref is not None:
                    sides["reference"] = (str(ref), dict(base_env, PYTHONPATH=""), None)
                for side, (python, env, source) in sides.items():
                    worker = "reference" if source is None else "ours"
                    run = run_worker(python, worker, {**spec, "source": str(source)}, env)
                    results.setdefault((side, method), []).append(run)
    print(
        f"test-time training on the mini benchmark: batch {args.batch_size} per task x 8 tasks, "
        f"{args.steps} timed steps after {args.warmup} warm-up, {args.threads} thread(s), median of {args.repeat}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    for method in args.methods.split(","):
        rows = {}
        for side in ("ours", "before", "reference"):
            runs = results.get((side, method))
            if not runs:
                continue
            wall = statistics.median(r["wall_s"] / r["steps"] for r in runs)
            cpu = statistics.median(r["cpu_s"] / r["steps"] for r in runs)
            rows[side] = (wall, cpu)
            print(f"{method:<11} {side:<10} {wall:6.3f} s/step wall ({1 / wall:5.2f} steps/s)  {cpu:6.3f} s/step CPU")
        if "reference" in rows:
            (ow, oc), (rw, rc) = rows["ours"], rows["reference"]
            print(f"{method}: ours / reference steps/s: wall {rw / ow:.2f}x, CPU {rc / oc:.2f}x (target >= 1.5)")
        if "before" in rows:
            (ow, oc), (bw, bc) = rows["ours"], rows["before"]
            print(f"{method}: ours / before steps/s: wall {bw / ow:.2f}x, CPU {bc / oc:.2f}x")
    if ref is None:
        print(reference_skip_message())


if __name__ == "__main__":
    main()
