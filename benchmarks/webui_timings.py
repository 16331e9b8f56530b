"""Timings of ``fusion_bench_webui``: start-up, and the Results view of 200 reports in headless Chromium.

* start-up: from starting the command to the first answered request (``GET /api/config``), median of
  ``--starts`` starts; also lists the heavy modules (torch, transformers, lightning) imported by then: none;
* render: 200 generated reports (25 methods × 8 λ values, 8 tasks) in a ``--results`` folder; Debian's
  chromium opens ``/results`` (with the page's Content-Security-Policy in force) in a new browser each
  time (a fresh profile, empty caches: a browser that has run plotly.js before compiles it faster, even in
  a new context), then once more in that context (what it fetched cached). A script the benchmark adds
  to the page marks the first frame painted after the page flags its tables drawn (``data-results-ready``)
  and after it flags its charts drawn (``data-charts-ready``), in seconds since the navigation started.
  The first load of each server comes right after its start (for a page whose server draws the charts,
  in the background after its first answer, that drawing has just begun) and is shown apart; then the
  median of ``--loads`` loads, with the ratio to the 1 s target.
* renderer CPU: one more fresh load per version with Chromium's trace on: the CPU time of the page's
  main thread (its tasks' thread time, from navigation to the charts drawn) and of V8's background
  compiling. Unlike the wall-clock times, these barely change with the load on the machine.
* server CPU for the charts: this checkout draws the charts of the 200 reports as SVG (matplotlib) once
  per state of the results; the CPU time of that drawing, in this process (matplotlib imported first).
* ``--baseline DIR``: the same loads, alternating, on a second server that runs the ``fusion_bench`` of
  another checkout, so both versions are timed under the same load on the machine;
  ``--baseline-rev REV``: that checkout is ``fusion_bench/`` of the commit ``REV``, exported with
  ``git archive`` into a temporary folder (e.g. ``--baseline-rev fa31fbc``, the page drawing its
  charts with plotly.js).

Run from the repository root (targets: start-up ≤ 1.5 s on 2 cores, render ≤ 1 s):
    python benchmarks/webui_timings.py [--reports 200] [--starts 5] [--loads 5] [--baseline DIR | --baseline-rev REV]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
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
TARGET_S = 1.0
# marks the first frame painted after each flag the page sets (same measure for any version of the page)
PAINT_MARKS = """
new MutationObserver((records) => {
  for (const r of records) {
    const name = "bench-" + r.attributeName + "-painted";
    if (r.target === document.body && performance.getEntriesByName(name).length === 0 && !window[name]) {
      window[name] = true;
      requestAnimationFrame(() => setTimeout(() => performance.mark(name), 0));
    }
  }
}).observe(document, { subtree: true, attributes: true, attributeFilter: ["data-results-ready", "data-charts-ready"] });
"""
MEASURES = {"tables drawn": "bench-data-results-ready-painted", "charts drawn": "bench-data-charts-ready-painted"}
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


def start(results: Path, runs: Path, code: Path | None = None) -> tuple[subprocess.Popen, str, float]:
    """Start the server (of the checkout ``code``, else this one); (process, base URL, seconds to the
    first answered request)."""
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
    # ``python -m`` puts the working folder first on sys.path: run there, or it imports this checkout's code
    env = dict(os.environ, PYTHONPATH=str(code)) if code is not None else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=code)
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


def load_once(pw, base: str, reports: int) -> dict[str, float]:
    """One new browser: ``/results`` opened twice; {"<visit>, <measure>": seconds}."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.add_init_script(PAINT_MARKS)
    page = context.new_page()
    out = {}
    for visit in ("first visit", "repeated visit"):  # the second one finds in the cache what the first fetched
        page.goto(base + "/results")
        page.wait_for_selector("body[data-charts-ready]", timeout=60_000)
        rows = page.locator('table[data-table="methods"] tbody tr').count()
        assert rows == reports, rows
        marks: dict = {}
        for _ in range(100):  # the paint marks come a frame after the flags
            marks = page.evaluate(
                "Object.fromEntries(performance.getEntriesByType('mark').map(m => [m.name, m.startTime]))"
            )
            if all(m in marks for m in MEASURES.values()):
                break
            page.wait_for_timeout(50)
        for measure, mark in MEASURES.items():
            out[f"{visit}, {measure}"] = marks[mark] / 1000
    browser.close()
    return out


def renderer_cpu(pw, base: str, trace: Path) -> dict[str, float]:
    """One new browser with Chromium's trace on: CPU seconds of the page's main thread (its top-level
    tasks, up to the charts drawn) and of V8's compiling on background threads."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    browser.start_tracing(page=page, path=str(trace), categories=["devtools.timeline", "v8", "toplevel"])
    page.goto(base + "/results")
    page.wait_for_selector("body[data-charts-ready]", state="attached", timeout=60_000)
    browser.stop_tracing()
    browser.close()
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X" and "tdur" in e]
    threads = collections.Counter((e["pid"], e["tid"]) for e in events if e["name"] == "EvaluateScript")
    main = threads.most_common(1)[0][0]
    tasks = ("ThreadControllerImpl::RunTask", "RunTask")
    main_cpu = sum(e["tdur"] for e in events if (e["pid"], e["tid"]) == main and e["name"] in tasks)
    background = sum(e["tdur"] for e in events if (e["pid"], e["tid"]) != main and e["name"] == "v8.parseOnBackground")
    return {"main thread": main_cpu / 1e6, "background compiling": background / 1e6}


def render_timings(versions: dict[str, str], reports: int, loads: int) -> dict[str, dict[str, list[float]]]:
    """{version: {"<visit>, <measure>": [seconds per load]}}; the versions take turns, and which one
    goes first alternates, so that both see the same load on the machine. Load 0 of each server (just
    started) is kept apart."""
    from playwright.sync_api import sync_playwright

    timings: dict[str, dict[str, list[float]]] = {name: {} for name in versions}
    with sync_playwright() as pw:
        for i in range(loads + 1):
            order = list(versions) if i % 2 == 0 else list(reversed(versions))
            for name in order:
                for key, seconds in load_once(pw, versions[name], reports).items():
                    key = key.replace("first visit", "first visit to a server just started") if i == 0 else key
                    timings[name].setdefault(key, []).append(seconds)
        with tempfile.TemporaryDirectory() as tmp:
            for i, (name, base) in enumerate(
                versions.items()
            ):  # a trace file each: one file read twice gave the first trace
                for key, seconds in renderer_cpu(pw, base, Path(tmp) / f"trace{i}.json").items():
                    timings[name][f"first visit, renderer CPU to the charts drawn, {key}"] = [seconds]
    return timings


def chart_drawing_cpu(results: Path, repeats: int = 3) -> float | None:
    """Median CPU seconds (this process) to draw the charts of the reports in ``results`` as SVG, or None
    where this checkout has no server-drawn charts."""
    try:
        from fusion_bench.webui.charts import render_svg
    except ImportError:
        return None
    from fusion_bench.webui.results import results_payload

    specs = results_payload([results])["charts"]
    render_svg(specs[0])  # imports matplotlib
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for spec in specs:
            render_svg(spec)
        times.append(time.process_time() - t0)
    return statistics.median(times)


def export_revision(rev: str, into: Path) -> Path:
    """``fusion_bench/`` of the commit ``rev`` (of this repository) written under ``into``; ``into``."""
    archive = subprocess.run(["git", "archive", rev, "fusion_bench"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=200)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--loads", type=int, default=5)
    baseline = parser.add_mutually_exclusive_group()
    baseline.add_argument("--baseline", type=Path, help="a checkout whose fusion_bench is timed alongside this one")
    baseline.add_argument("--baseline-rev", help="a commit whose fusion_bench/ is timed alongside this checkout")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average at the start {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as tmp:
        results, runs = Path(tmp) / "results", Path(tmp) / "runs"
        results.mkdir()
        write_reports(results, args.reports)
        codes = {"this checkout": None}
        if args.baseline is not None:
            codes[f"baseline {args.baseline}"] = args.baseline.resolve()
        if args.baseline_rev is not None:
            (Path(tmp) / "baseline").mkdir()
            codes[f"baseline {args.baseline_rev}"] = export_revision(args.baseline_rev, Path(tmp) / "baseline")
        for name, code in codes.items():
            starts = []
            for _ in range(args.starts):
                proc, base, seconds = start(results, runs, code)
                starts.append(seconds)
                stop(proc)
            print(
                f"{name}: start-up to first answer: median {statistics.median(starts):.2f} s "
                f"(all: {', '.join(f'{s:.2f}' for s in starts)})"
            )
        print(f"heavy modules imported at start-up: {heavy_modules_at_start() or 'none'}")
        drawing = chart_drawing_cpu(results)
        if drawing is not None:
            print(f"this checkout: server CPU to draw the charts of {args.reports} reports (SVG): {drawing:.2f} s")
        print(f"load average before the page loads {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        servers = {name: start(results, runs, code) for name, code in codes.items()}
        try:
            timings = render_timings({name: base for name, (_, base, _) in servers.items()}, args.reports, args.loads)
        finally:
            for proc, _, _ in servers.values():
                stop(proc)
    print(f"load average at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for name, measured in timings.items():
        for key, values in measured.items():
            median = statistics.median(values)
            if "CPU" in key:
                print(f"{name}: /results with {args.reports} reports, {key}: {median:.2f} s")
                continue
            print(
                f"{name}: /results with {args.reports} reports, {key}: median {median:.2f} s "
                f"= {median / TARGET_S:.2f} × the {TARGET_S:g} s target (all: {', '.join(f'{s:.2f}' for s in values)})"
            )


if __name__ == "__main__":
    main()
