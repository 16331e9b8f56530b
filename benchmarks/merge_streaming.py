"""Benchmark: streaming data-free merges vs the bytes-read floor and a load-everything baseline.

Builds 1 + N random checkpoints of the CLIP ViT-B/32 vision-encoder shape (~88M parameters,
~350 MB each as float32 safetensors), then runs each variant in its own subprocess and reports
wall time and peak RSS:

  floor        read every tensor of every checkpoint once (the bytes-read bandwidth floor)
  stream:<m>   fusion_bench's streaming merge of method <m> (task_arithmetic, ties_merging, ...)
  naive:<m>    load all state dicts into memory, then apply the same method's in-memory core

Targets (issue 3): streaming peak RSS above the idle interpreter <= 1.25 x (one model + output),
streaming wall <= 1.5 x the floor. Run:  python benchmarks/merge_streaming.py [--models 8] [--small] [--cold]
(--cold: every variant reads the checkpoints from disk, as a first merge of downloaded models does;
without it they come from the page cache, which makes the floor a memory-copy floor.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def naive_merge(pool, method: str) -> dict:
    """The baseline: every state dict in memory at once, then the method's in-memory core."""
    from fusion_bench.method.task_vector.task_arithmetic import task_arithmetic

    base = {k: pool.get_tensor("_pretrained_", k) for k in pool.keys("_pretrained_")}
    finetuned = [{k: pool.get_tensor(n, k) for k in base} for n in pool.model_names]
    if method == "task_arithmetic":
        return task_arithmetic(base, finetuned, scaling_factor=0.3)
    if method == "ties_merging":
        from fusion_bench.method.task_vector.ties_merging import ties_merging

        return ties_merging(base, finetuned, threshold=20, scaling_factor=0.3)
    raise ValueError(f"no naive baseline for {method!r}")


def build_checkpoints(root: Path, n_models: int, small: bool) -> list[Path]:
    """Save ``_pretrained_`` and ``n_models`` perturbed copies as CLIP vision checkpoints."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = (
        CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4) if small else CLIPVisionConfig()
    )
    torch.manual_seed(0)
    base = CLIPVisionModel(config)
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    dirs = []
    for i in range(n_models + 1):
        d = root / ("pretrained" if i == 0 else f"model_{i}")
        d.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(d)
        gen = torch.Generator().manual_seed(i)
        sd = state if i == 0 else {k: v + 1e-3 * torch.randn(v.shape, generator=gen) for k, v in state.items()}
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs.append(d)
    return dirs


def _status_bytes(field: str) -> int:
    """``VmHWM``/``VmRSS`` of this process from /proc (reset at exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(variant: str, dirs: list[str]) -> dict:
    """Run one variant in this (fresh) process; return timings and memory."""
    import torch  # noqa: F401  (imports are part of the idle baseline)
    from transformers import CLIPVisionModel  # noqa: F401

    from transformers import CLIPVisionConfig

    from fusion_bench.method import ALGORITHMS
    from fusion_bench.modelpool import CLIPVisionModelPool

    # the first model construction imports much of transformers (seconds): a one-time cost of the
    # library, not of merging, so pay it on a tiny model before the clock starts
    CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2))
    idle = _status_bytes("VmHWM")
    models = {"_pretrained_": dirs[0], **{f"m{i}": d for i, d in enumerate(dirs[1:], 1)}}
    pool = CLIPVisionModelPool(models)
    start = time.perf_counter()
    kind, _, method = variant.partition(":")
    if kind == "floor":
        for name in pool.all_model_names:
            source = pool.tensor_source(name)
            for key in source.keys():
                source.get(key)
    elif kind == "stream":
        ALGORITHMS.get(method)().run(pool)
    else:
        naive_merge(pool, method)
    wall = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    return {"variant": variant, "wall_s": wall, "peak_rss": peak, "idle_rss": idle}


def evict_from_page_cache(dirs: list[Path]) -> None:
    """Drop the checkpoints' pages from the OS page cache (``posix_fadvise(DONTNEED)``), so the next
    variant reads them from disk: a first merge of freshly downloaded models, not a warm re-run."""
    for d in dirs:
        for f in d.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_variant(variant: str, dirs: list[Path], *, cold: bool = False) -> dict:
    if cold:
        evict_from_page_cache(dirs)
    out = subprocess.run(
        [sys.executable, __file__, "--child", variant, *map(str, dirs)], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=8)
    parser.add_argument("--methods", default="task_arithmetic,ties_merging")
    parser.add_argument("--small", action="store_true", help="a 4-layer, 192-wide encoder (quick check)")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="evict the checkpoints from the page cache before every variant (reads from disk)",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1:])))
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        dirs = build_checkpoints(Path(tmp), args.models, args.small)
        model_bytes = (dirs[0] / "model.safetensors").stat().st_size
        floor = min((run_variant("floor", dirs, cold=args.cold) for _ in range(2)), key=lambda r: r["wall_s"])
        results = [floor]
        for method in args.methods.split(","):
            results += [
                run_variant(f"stream:{method}", dirs, cold=args.cold),
                run_variant(f"naive:{method}", dirs, cold=args.cold),
            ]
    print("page cache:", "evicted before every variant (cold reads)" if args.cold else "warm (files just written)")
    report(results, model_bytes, args.models, floor)


def report(results: list[dict], model_bytes: int, n_models: int, floor: dict) -> None:
    mb = 1024**2
    budget = 2 * model_bytes  # one model + the output
    print(
        f"\n{n_models} models + base, {model_bytes / mb:.0f} MB each; read floor {floor['wall_s']:.2f} s "
        f"({(n_models + 1) * model_bytes / mb / floor['wall_s']:.0f} MB/s)"
    )
    print(
        f"{'variant':28s} {'wall s':>8s} {'x floor':>8s} {'peak RSS MB':>12s} {'above idle MB':>14s} {'x (model+out)':>14s}"
    )
    for r in results:
        above = r["peak_rss"] - r["idle_rss"]
        print(
            f"{r['variant']:28s} {r['wall_s']:8.2f} {r['wall_s'] / floor['wall_s']:8.2f} "
            f"{r['peak_rss'] / mb:12.0f} {above / mb:14.0f} {above / budget:14.2f}"
        )
    by = {r["variant"]: r for r in results}
    for v in [r["variant"] for r in results if r["variant"].startswith("stream:")]:
        naive = by.get("naive:" + v.split(":")[1])
        if naive:
            print(
                f"{v}: {naive['wall_s'] / by[v]['wall_s']:.2f}x faster and "
                f"{naive['peak_rss'] / by[v]['peak_rss']:.2f}x less peak RSS than {naive['variant']}"
            )


if __name__ == "__main__":
    main()
