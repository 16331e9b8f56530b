"""Figures of the result tables (matplotlib, Agg backend; PNG written atomically).

* :func:`bar_chart`: per-task bars, one colour per method (row), the average last;
* :func:`heatmap`: the cross-task matrix (rows: models, columns: tasks), values written in the cells;
* :func:`sweep_plot`: the average against a swept option (``scaling_factor``), one line per method.

Row ``i`` is drawn in :data:`COLORS` ``[i % 10]`` (matplotlib's ``tab10``), with no edge lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")

from fusion_bench.reporting.tables import Table  # noqa: E402
from fusion_bench.utils.io import atomic_write  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["COLORS", "bar_chart", "heatmap", "sweep_plot", "save_figure", "figures_for"]

COLORS = [matplotlib.colormaps["tab10"](i) for i in range(10)]


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def bar_chart(table: Table) -> "Figure":
    """Grouped bars: x = the table's columns, one bar per row (missing values are left out)."""
    n_rows, n_cols = max(len(table.rows), 1), len(table.columns)
    fig = _figure(max(6.0, 0.35 * n_rows * n_cols + 2), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / n_rows
    for i, row in enumerate(table.rows):
        xs = [j + (i - (n_rows - 1) / 2) * width for j, v in enumerate(row.values) if v is not None]
        ax.bar(
            xs,
            [v for v in row.values if v is not None],
            width,
            color=COLORS[i % 10],
            linewidth=0,
            label=row.label + (f" {row.flags}" if row.flags else ""),
        )
    ax.set_xticks(range(n_cols), table.columns, rotation=30, ha="right")
    ax.set_ylabel(table.title.split(" of ")[0])
    ax.set_title(table.title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def heatmap(table: Table, *, cmap: str = "viridis") -> "Figure":
    """The table as a coloured grid (the ``avg`` column left out), each value written in its cell."""
    import numpy as np

    cols = [i for i, c in enumerate(table.columns) if c != "avg"]
    grid = np.array(
        [[np.nan if row.values[j] is None else row.values[j] for j in cols] for row in table.rows], dtype=float
    )
    fig = _figure(max(4.0, 0.7 * len(cols) + 3), max(3.0, 0.45 * len(table.rows) + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(cols)), [table.columns[j] for j in cols], rotation=30, ha="right")
    ax.set_yticks(range(len(table.rows)), [r.label + (f" {r.flags}" if r.flags else "") for r in table.rows])
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(
                j,
                i,
                f"{value:.1f}",
                ha="center",
                va="center",
                fontsize="small",
                color="black" if value > middle else "white",
            )
    fig.colorbar(image, ax=ax)
    ax.set_title(table.title)
    return fig


def sweep_plot(table: Table) -> "Figure":
    """One line (with markers) per row of a sweep table against its numeric columns ``table.x``."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for i, row in enumerate(table.rows):
        points = [(x, v) for x, v in zip(table.x or [], row.values) if v is not None]
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker="o",
            color=COLORS[i % 10],
            label=row.label + (f" {row.flags}" if row.flags else ""),
        )
    ax.set_xlabel(table.name.removeprefix("sweep_"))
    ax.set_ylabel(table.title.split(" against ")[0])
    ax.set_title(table.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def save_figure(fig: "Figure", path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically and return the path."""
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png")
    return Path(path)


def figures_for(tables: list[Table], out_dir: str | Path) -> list[Path]:
    """The figures of ``tables`` in ``out_dir``: bars of each methods table, the cross-task
    heatmap, the sweep curves (``<table name>.png``)."""
    out_dir, paths = Path(out_dir), []
    for table in tables:
        if not table.rows:
            continue
        if table.name == "cross_task":
            paths.append(save_figure(heatmap(table), out_dir / "cross_task.png"))
        elif table.x is not None:
            paths.append(save_figure(sweep_plot(table), out_dir / f"{table.name}.png"))
        elif table.name.startswith(("methods", "by_")):
            paths.append(save_figure(bar_chart(table), out_dir / f"{table.name}.png"))
    return paths
