"""The Results view's charts: what each one shows (a spec), drawn on the server as an SVG image by matplotlib.

* :func:`chart_specs`: per-task bars (the 12 best rows of the methods table by average) and one curve chart
  per λ-sweep table, from the tables of ``fusion_bench_report``; the page shows the SVG of each spec and,
  on request, draws the same spec with plotly.js (hover values, zoom);
* :func:`render_svg`: a spec as SVG. Text stays text (``<text>`` elements, escaped by matplotlib's XML
  writer; ``$`` is not read as math), nothing is fetched (no fonts, no scripts), and the same spec gives
  the same bytes;
* :class:`ChartStore`: SVG images by a key made from their spec, rendered one at a time on a worker thread
  as soon as the server starts or the page's data names them; the newest ones kept.

Drawing on the server keeps the first visit of a page with 200 reports fast: the browser decodes two
images instead of compiling 4.6 MB of plotly.js (``benchmarks/webui_timings.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import textwrap
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["BARS_SHOWN", "COLORS", "ChartStore", "chart_key", "chart_specs", "render_svg"]

BARS_SHOWN = 12  # rows in the per-task bars: the best by average
# matplotlib's tab10, then the lighter tab20 partner of each (the first ten are fusion_bench_report's figures' colours)
COLORS = (
    *("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"),
    *("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"),
)
MARKERS = ("o", "s", "^", "D", "v")  # a curve's marker changes with each round of the 20 colours
WIDTH_IN, HEIGHT_IN = 11.0, 3.8  # the figure's size; the page shows it at 96 px an inch
TICK_CHARS = 80  # the longest task name's length × the number of tasks above which they are written aslant
LABEL_CHARS = 48  # a legend label's line length: longer labels take more lines
LEGEND_ROWS = 16  # legend entries a column holds before the legend takes another column (at most 3)
RC = {
    "svg.fonttype": "none",  # text as <text> (the browser's fonts), not as glyph outlines
    "svg.hashsalt": "fusion_bench",  # element ids that do not change from one drawing to the next
    "text.parse_math": False,  # a label with two '$' stays as written
    "text.usetex": False,
    "font.size": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
STYLE_VERSION = 1  # part of each key: a change to the drawing code gives new image addresses


def _series(rows: Sequence[Any], values: Any) -> list[dict[str, Any]]:
    return [{"label": r.label, "values": values(r), "color": COLORS[i % len(COLORS)]} for i, r in enumerate(rows)]


def _bars_spec(table: Any) -> dict[str, Any]:
    """The ``BARS_SHOWN`` best rows by the last column (the average), on the other columns (the tasks)."""
    rows = sorted(table.rows, key=lambda r: -1 if r.values[-1] is None else r.values[-1], reverse=True)
    more = len(table.rows) > BARS_SHOWN
    return {
        "id": "bars",
        "kind": "bars",
        "heading": "",
        "title": f"the {BARS_SHOWN} best rows by average" if more else "",
        "categories": list(table.columns[:-1]),
        "xlabel": "",
        "ylabel": "accuracy (%)",
        "series": _series(rows[:BARS_SHOWN], lambda r: list(r.values[:-1])),
    }


def _sweep_spec(table: Any) -> dict[str, Any]:
    return {
        "id": table.name,
        "kind": "lines",
        "heading": table.title,
        "title": "",
        "x": list(table.x),
        "xlabel": table.name.removeprefix("sweep_"),
        "ylabel": "average accuracy (%)",
        "series": _series(table.rows, lambda r: list(r.values)),
    }


def chart_specs(tables: Sequence[Any]) -> list[dict[str, Any]]:
    """The specs of the charts of ``tables`` (:class:`~fusion_bench.reporting.tables.Table`): none unless a
    table is a methods, cross-task or sweep table; then the bars of the ``methods`` table (else of the first
    table that is not a sweep) and the curves of each sweep table."""
    if not any(t.name.startswith("methods") or t.name == "cross_task" or t.x for t in tables):
        return []
    bars = next((t for t in tables if t.name == "methods"), None) or next((t for t in tables if not t.x), None)
    specs = [_bars_spec(bars)] if bars is not None and bars.rows else []
    return specs + [_sweep_spec(t) for t in tables if t.x and t.rows]


def chart_key(spec: dict[str, Any]) -> str:
    """20 hex digits naming ``spec``'s image (its content and the drawing code's version)."""
    text = json.dumps([STYLE_VERSION, spec], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def figure_size_px(spec: dict[str, Any]) -> tuple[int, int]:
    """The image's size in CSS pixels (the page reserves it before the image arrives)."""
    return round(WIDTH_IN * 96), round(_height_in(spec) * 96)


def _legend_columns(n: int) -> int:
    return min(3, max(1, math.ceil(n / LEGEND_ROWS)))


def _height_in(spec: dict[str, Any]) -> float:
    n = len(spec["series"])
    return max(HEIGHT_IN, 0.18 * math.ceil(n / _legend_columns(n)) + 0.6)


def _wrap(label: str) -> str:
    """``label`` in lines of at most ``LABEL_CHARS`` characters (a long label would narrow the plot)."""
    return "\n".join(textwrap.wrap(label, LABEL_CHARS, break_on_hyphens=False)) or label


def _draw_bars(ax: Any, spec: dict[str, Any]) -> None:
    n, categories = max(len(spec["series"]), 1), spec["categories"]
    width = 0.8 / n
    for i, s in enumerate(spec["series"]):
        points = [(j + (i - (n - 1) / 2) * width, v) for j, v in enumerate(s["values"]) if v is not None]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.bar(xs, ys, width, color=s["color"], linewidth=0, label=_wrap(s["label"]))
    crowded = max((len(c) for c in categories), default=0) * len(categories) > TICK_CHARS
    ax.set_xticks(
        range(len(categories)), categories, rotation=25 if crowded else 0, ha="right" if crowded else "center"
    )


def _draw_lines(ax: Any, spec: dict[str, Any]) -> None:
    for i, s in enumerate(spec["series"]):
        points = [(x, v) for x, v in zip(spec["x"], s["values"]) if v is not None]
        marker = MARKERS[(i // len(COLORS)) % len(MARKERS)]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, marker=marker, markersize=4, color=s["color"], label=_wrap(s["label"]))
    ax.grid(alpha=0.3)


def render_svg(spec: dict[str, Any]) -> bytes:
    """``spec`` drawn as an SVG document (UTF-8)."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context(RC), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. a glyph missing from the font that measures the text
        fig = Figure(figsize=(WIDTH_IN, _height_in(spec)), layout="constrained")
        ax = fig.add_subplot()
        (_draw_bars if spec["kind"] == "bars" else _draw_lines)(ax, spec)
        ax.set_xlabel(spec["xlabel"])
        ax.set_ylabel(spec["ylabel"])
        if spec["title"]:
            ax.set_title(spec["title"], fontsize="medium")
        n = len(spec["series"])
        fig.legend(loc="outside right upper", fontsize="small", ncols=_legend_columns(n), frameon=False)
        out = io.BytesIO()
        fig.savefig(out, format="svg", metadata={"Date": None})
    return out.getvalue()


def _import_matplotlib() -> None:
    import matplotlib.backends.backend_svg
    import matplotlib.figure  # noqa: F401


class ChartStore:
    """SVG images by :func:`chart_key`: each spec is rendered once, on one worker thread, as soon as it is
    added; the ``size`` most recently added are kept."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._images: OrderedDict[str, Future[bytes]] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusion_bench-charts")

    def prepare(self, specs: Callable[[], list[dict[str, Any]]]) -> None:
        """On the worker: import matplotlib, then render the charts ``specs()`` names (the server calls this
        as it starts, so that the first visit of the Results view finds its charts drawn)."""

        def run() -> None:
            _import_matplotlib()
            for spec in specs():
                self.add(spec)

        self._pool.submit(run)

    def add(self, spec: dict[str, Any]) -> str:
        """``spec``'s key; its image is rendered unless it is already kept."""
        key = chart_key(spec)
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
            else:
                self._images[key] = self._pool.submit(render_svg, spec)
                while len(self._images) > self.size:
                    self._images.popitem(last=False)
        return key

    def svg(self, key: str) -> bytes | None:
        """The image kept under ``key`` (waiting for its rendering), or None."""
        with self._lock:
            image = self._images.get(key)
        return None if image is None else image.result()

    def close(self) -> None:
        """Stop the worker; renderings not started are dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)
