"""Timings of ``fusion_bench_webui``: start-up, and the Results view of 200 reports in headless Chromium.

* start-up: from starting the command to the first answered request (``GET /api/config``), median of
  ``--starts`` starts; also lists the heavy modules (torch, transformers, lightning) imported by then: none;
* render: 200 generated reports (25 methods × 8 λ values, 8 tasks) in a ``--results`` folder; Debian's
  chromium opens ``/results`` (with the page's Content-Security-Policy in force) in a fresh context each
  time; the page marks when its tables are drawn and when its charts are (``performance.mark``, in ms
  since the navigation started). Median of ``--loads`` loads.

Run from the repository root (targets: start-up ≤ 1.5 s on 2 cores, render ≤ 1 s):
    python benchmarks/webui_timings.py [--reports 200] [--starts 5] [--loads 5]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TASKS = ["shape", "color", "texture", "background", "size", "quality", "digit", "count"]


def write_reports(folder: Path, n: int) -> None:
    """``n`` reports: methods ``m00``.. with 8 λ values each; accuracies vary with both."""
    lambdas = [0.1 * (i + 1) for i in range(8)]
    for i in range(n):
        method, lam = f"method_{i // len(lambdas):02d}", lambdas[i % len(lambdas)]
        accs = {t: round(0.3 + 0.05 * ((i * 7 + j * 3) % 11) + 0.1 * lam, 4) for j, t in enumerate(TASKS)}
        report = {
            **{t: {"accuracy": a} for t, a in accs.items()},
            "average": {"accuracy": sum(accs.values()) / len(accs)},
            "meta": {
                "seed": 42,
                "fusion_bench_version": "bench",
                "hydra": {"choices": {"method": method}},
                "config": {"seed": 42, "method": {"_target_": method, "scaling_factor": lam}},
            },
        }
        (folder / f"report_{i:03d}.json").write_text(json.dumps(report), encoding="utf-8")


def start(results: Path, runs: Path) -> tuple[subprocess.Popen, str, float]:
    """Start the server; (process, base URL, seconds to the first answered request)."""
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "fusion_bench.webui",
        "--port",
        "0",
        "--results",
        str(results),
        "--runs-dir",
        str(runs),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    base = re.match(r".*(http://[\d.:]+)/", line).group(1)
    with urllib.request.urlopen(base + "/api/config", timeout=30) as response:
        response.read()
    return proc, base, time.perf_counter() - t0


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(2)
    proc.communicate(timeout=30)


def heavy_modules_at_start() -> list[str]:
    code = (
        "import sys; from pathlib import Path; import uvicorn; from fusion_bench.webui.server import parse_args; "
        "from fusion_bench.webui.app import Settings, create_app; create_app(Settings('t', [], Path('r'))); "
        "print(','.join(m for m in ('torch', 'transformers', 'lightning', 'hydra') if m in sys.modules))"
    )
    return [
        m
        for m in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        .stdout.strip()
        .split(",")
        if m
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=200)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        results, runs = Path(tmp) / "results", Path(tmp) / "runs"
        results.mkdir()
        write_reports(results, args.reports)
        starts = []
        for _ in range(args.starts):
            proc, base, seconds = start(results, runs)
            starts.append(seconds)
            stop(proc)
        print(
            f"start-up to first answer: median {statistics.median(starts):.2f} s (all: {', '.join(f'{s:.2f}' for s in starts)})"
        )
        print(f"heavy modules imported at start-up: {heavy_modules_at_start() or 'none'}")
        proc, base, _ = start(results, runs)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                timings: dict[str, list[float]] = {}
                for _ in range(args.loads):
                    context = browser.new_context(viewport={"width": 1280, "height": 900})
                    page = context.new_page()
                    for visit in ("first visit", "repeated visit"):  # the second one finds plotly.js in the cache
                        page.goto(base + "/results")
                        page.wait_for_selector("body[data-charts-ready]", timeout=60_000)
                        rows = page.locator('table[data-table="methods"] tbody tr').count()
                        assert rows == args.reports, rows
                        marks = page.evaluate(
                            "Object.fromEntries(performance.getEntriesByType('mark').map(m => [m.name, m.startTime]))"
                        )
                        timings.setdefault(f"{visit}, tables drawn", []).append(
                            marks["fusionbench-tables-ready"] / 1000
                        )
                        timings.setdefault(f"{visit}, charts drawn too", []).append(
                            marks["fusionbench-charts-ready"] / 1000
                        )
                    context.close()
                browser.close()
        finally:
            stop(proc)
        for name, values in timings.items():
            print(
                f"/results with {args.reports} reports, {name}: median {statistics.median(values):.2f} s (all: {', '.join(f'{s:.2f}' for s in values)})"
            )


if __name__ == "__main__":
    main()
