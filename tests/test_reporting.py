"""fusion_bench_report: reports -> tables (exact cells), Markdown/CSV/LaTeX, figures checked by their pixels."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image as mpimg

from fusion_bench.errors import ConfigError
from fusion_bench.reporting import build_tables, load_runs, to_csv, to_latex, to_markdown
from fusion_bench.reporting.figures import COLORS, bar_chart, heatmap, save_figure, sweep_plot
from fusion_bench.reporting.tables import Row, Table
from fusion_bench.scripts.report import main

TASKS = ["sun397", "stanford_cars", "mnist"]


def report(accs, method, *, params=None, model=None, fast=False, samples=100, extra=None, meta=None):
    """A report as the program writes it (only the fields the collector reads)."""
    out = {"model_info": {"all_params": 1}, **{t: {"accuracy": a, "loss": 1.0} for t, a in zip(TASKS, accs)}}
    out["average"] = {"accuracy": sum(accs) / len(accs), "loss": 1.0}
    models = {"_pretrained_": {"pretrained_model_name_or_path": model}} if model else {"_pretrained_": "b", "x": "x"}
    target = "DummyAlgorithm" if model else method
    out["meta"] = {
        "fast_dev_run": fast,
        "seed": 42,
        "num_samples": {t: samples for t in TASKS},
        **(meta or {}),
        "hydra": {"choices": {"method": "dummy" if model else method}},
        "config": {
            "method": {"_target_": f"fusion_bench.method.{target}", **(params or {})},
            "modelpool": {"models": models},
        },
    }
    out.update(extra or {})
    return out


def write(root, name, obj):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def reports(tmp_path):
    root = tmp_path / "reports"
    for i, lam in enumerate([0.1, 0.3, 0.5]):
        write(
            root,
            f"sweep/ta_{lam}/report.json",
            report([0.5 + 0.1 * i, 0.4, 0.9 - 0.2 * i], "task_arithmetic", params={"scaling_factor": lam}),
        )
    write(root, "avg.json", report([0.6, 0.5, 0.7], "simple_average", fast=True))
    for j, task in enumerate(TASKS):  # hub-style names (stanford-cars for stanford_cars), files in another order
        accs = [0.3, 0.2, 0.4]
        accs[j] = 0.95
        write(root, f"experts/{3 - j}.json", report(accs, None, model=f"tanganke/clip_{task.replace('_', '-')}"))
    write(root, "experts/base.json", report([0.6, 0.55, 0.45], None, model="openai/clip", samples=50))
    write(root, "sweep/.hydra/ignored.json", {"sun397": {"accuracy": 1.0}})  # hidden folders are skipped
    write(root, "other.json", {"seconds": 3})  # not a report
    return root


def cells(table):
    return {row.label: [None if v is None else round(v, 6) for v in row.values] for row in table.rows}


def test_tables_from_reports(reports):
    runs = load_runs([reports])
    assert len(runs) == 8
    methods, cross, sweep = build_tables(runs)
    assert methods.columns == [*TASKS, "avg"]
    assert cells(methods) == {
        "task_arithmetic (scaling_factor=0.1)": [50.0, 40.0, 90.0, 60.0],
        "task_arithmetic (scaling_factor=0.3)": [60.0, 40.0, 70.0, 56.666667],
        "task_arithmetic (scaling_factor=0.5)": [70.0, 40.0, 50.0, 53.333333],
        "simple_average": [60.0, 50.0, 70.0, 60.0],
    }
    assert {r.label: r.flags for r in methods.rows}["simple_average"] == "†" and methods.notes[0].startswith(
        "† fast_dev_run"
    )
    # the cross-task matrix: pre-trained first, then each expert on its own task's column (the diagonal)
    assert [r.label for r in cross.rows] == ["clip", "clip_sun397", "clip_stanford-cars", "clip_mnist"]
    assert [cross.rows[i + 1].values[i] for i in range(3)] == [95.0, 95.0, 95.0]
    assert cross.rows[0].flags == "‡"  # 50 test samples where the others used 100
    assert sweep.name == "sweep_scaling_factor" and sweep.x == [0.1, 0.3, 0.5]
    assert cells(sweep) == {"task_arithmetic": [60.0, 56.666667, 53.333333]}


def test_sections_groups_and_partial_rows(tmp_path):
    seen = {"seen": {"sun397": {"accuracy": 0.8}, "average": {"accuracy": 0.8}}, "unseen": {"mnist": {"accuracy": 0.3}}}
    write(tmp_path, "gen.json", report([0.8, 0.6, 0.3], "ties", extra=seen))
    for corruption, base in (("contrast", 0.5), ("fog", 0.4)):
        for method, bonus in (("ties", 0.1), ("task_arithmetic", 0.0)):
            r = report([base + bonus] * 3, method, meta={"corruption": corruption})
            write(tmp_path, f"rob/{corruption}_{method}.json", r)
    del_task = report([0.7, 0.7, 0.7], "simple_average")
    del del_task["mnist"]
    write(tmp_path, "partial.json", del_task)

    runs = load_runs([tmp_path / "gen.json", tmp_path / "partial.json"])
    names = {t.name: t for t in build_tables(runs)}
    assert list(names) == ["methods", "methods_seen", "methods_unseen"]
    assert cells(names["methods_seen"]) == {"ties": [80.0, 80.0]} and cells(names["methods_unseen"]) == {
        "ties": [30.0, 30.0]
    }
    assert {r.label: r.flags for r in names["methods"].rows} == {"ties": "", "simple_average": "‡"}
    assert cells(names["methods"])["simple_average"][2] is None

    summary, *per_value = build_tables(load_runs([tmp_path / "rob"]), group_by="corruption")
    assert summary.columns == ["contrast", "fog"]
    assert cells(summary) == {"ties": [60.0, 50.0], "task_arithmetic": [50.0, 40.0]}
    assert [t.title for t in per_value] == [
        "accuracy (%) with corruption = contrast",
        "accuracy (%) with corruption = fog",
    ]
    with pytest.raises(ConfigError, match=r"group_by 'meta.nope': no report has this meta/config field"):
        build_tables(runs, group_by="meta.nope")


def test_labels_name_a_missing_field_unset(tmp_path):
    """Runs of one method, one without meta.hydra.choices: the label says ``unset``, never an object repr."""
    with_choice = report([0.5, 0.5, 0.5], "ties_merging", meta={"hydra": {}})
    with_choice["meta"]["hydra"] = {"choices": {"method": "ties_merging", "modelpool": "CLIPVisionModelPool/a"}}
    without = report([0.4, 0.4, 0.4], "ties_merging")
    del without["meta"]["hydra"]
    write(tmp_path, "a.json", with_choice)
    write(tmp_path, "b.json", without)
    labels = sorted(row.label for row in build_tables(load_runs([tmp_path]))[0].rows)
    assert labels == ["ties_merging (modelpool=CLIPVisionModelPool/a)", "ties_merging (modelpool=unset)"]


def test_markdown_csv_latex():
    table = Table(
        "methods",
        "accuracy (%) of each method",
        ["cars_2", "avg"],
        [Row("ties (k=20%)", [61.25, None], "†")],
        ["† fast_dev_run: only the first batches"],
    )
    assert to_markdown(table).splitlines() == [
        "### accuracy (%) of each method",
        "",
        "| | cars_2 | avg |",
        "|---|---:|---:|",
        "| ties (k=20%) † | 61.2 | – |",
        "",
        "† fast_dev_run: only the first batches",
    ]
    assert list(csv.reader(io.StringIO(to_csv(table)))) == [
        ["label", "cars_2", "avg", "flags"],
        ["ties (k=20%)", "61.25", "", "†"],
    ]
    tex = to_latex(table, digits=2)
    assert "\\begin{tabular}{lrr}" in tex and "Method & cars\\_2 & avg \\\\" in tex
    assert "ties (k=20\\%)\\textsuperscript{\\dag} & 61.25 & -- \\\\" in tex and "\\bottomrule" in tex


def pixels(fig, path):
    save_figure(fig, path)
    return mpimg.imread(path)[..., :3]  # (H, W, 3) floats in [0, 1]


def color_mask(img, color):
    return np.all(np.abs(img - np.array(color[:3])) < 0.01, axis=-1)


def test_bar_chart_bars_are_as_tall_as_their_values(tmp_path):
    table = Table("methods", "accuracy (%) of each method", ["mnist"], [Row("a", [80.0]), Row("b", [20.0])])
    img = pixels(bar_chart(table), tmp_path / "bars.png")
    assert img.shape[0] == 400 and img.shape[1] >= 600 and img.std() > 0.05  # 6x4 in at 100 dpi, not blank
    heights = []
    for i in range(2):
        mask = color_mask(img, COLORS[i])
        columns = mask.sum(axis=0)
        heights.append(np.median(columns[columns > 0.5 * columns.max()]))  # the bar's columns (not the legend's patch)
    assert heights[0] / heights[1] == pytest.approx(4.0, rel=0.05)


def test_heatmap_and_sweep_curve_pixels(tmp_path):
    import matplotlib

    grid = Table(
        "cross_task",
        "accuracy (%) of each model on each task",
        ["a", "b", "avg"],
        [Row("m1", [10.0, 90.0, 50.0]), Row("m2", [50.0, 30.0, 40.0])],
    )
    img = pixels(heatmap(grid), tmp_path / "heat.png")
    cmap = matplotlib.colormaps["viridis"]
    low, high = color_mask(img, cmap(0.0)), color_mask(img, cmap(1.0))
    assert low.sum() > 500 and high.sum() > 500  # the 10 and the 90 cells are the colormap's ends
    assert np.argwhere(low)[:, 1].mean() < np.argwhere(high)[:, 1].mean()  # 10 in column a, left of the 90 in b

    curve = Table(
        "sweep_scaling_factor",
        "average accuracy (%) against scaling_factor",
        ["0.1", "0.5", "0.9"],
        [Row("ta", [40.0, 70.0, 50.0])],
        x=[0.1, 0.5, 0.9],
    )
    img = pixels(sweep_plot(curve), tmp_path / "curve.png")
    ys, xs = np.nonzero(color_mask(img, COLORS[0]))
    line = xs < 0.8 * img.shape[1]  # leave the legend (upper right) out
    top = xs[line][ys[line].argmin()]  # the highest point of the line: the peak at x = 0.5, mid-plot
    assert abs(top - np.median(xs[line])) < 0.1 * img.shape[1]


def test_command_writes_tables_and_figures(reports, tmp_path, capsys):
    out = tmp_path / "out"
    main([str(reports), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| task_arithmetic (scaling_factor=0.1) | 50.0 | 40.0 | 90.0 | 60.0 |" in printed
    assert (out / "tables.md").read_text() + "\n" == printed
    assert list(csv.reader(open(out / "cross_task.csv")))[1] == ["clip", "60.0", "55.0", "45.0", "53.333333", "‡"]
    assert "\\toprule" in (out / "sweep_scaling_factor.tex").read_text()
    for name in ("methods", "cross_task", "sweep_scaling_factor"):
        img = mpimg.imread(out / "figures" / f"{name}.png")
        assert img.shape[0] >= 300 and img[..., :3].std() > 0.05


def test_command_errors_are_one_line(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    for args, message in [
        ([str(tmp_path)], "no fusion_bench JSON report (an object with task accuracies) in"),
        ([str(tmp_path / "nope")], "no such file or folder: "),
    ]:
        proc = subprocess.run(
            [sys.executable, "-m", "fusion_bench.scripts.report", *args], capture_output=True, text=True
        )
        assert proc.returncode == 2
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"fusion_bench_report: error: {message}")
