"""``fusion_bench_webui`` in a real browser (Debian's chromium through Playwright) and over raw HTTP.

One server (127.0.0.1, a free port) and one browser for the module. Without chromium the browser
tests skip, except under ``CI=true``, where they fail. ``FUSION_BENCH_UPDATE_SCREENSHOTS=1``
rewrites the screenshots in ``docs/images/``.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_not_ignored

CHROMIUM = os.environ.get("FUSION_BENCH_CHROMIUM", "/usr/bin/chromium")
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
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "images"
EVIL_TASK = "<script>window.__pwned = 1</script>"


def _report(method: str, accuracies: dict[str, float], **params) -> dict:
    """A report as ``fusion_bench`` writes it (the fields the collector reads)."""
    return {
        **{task: {"accuracy": acc} for task, acc in accuracies.items()},
        "average": {"accuracy": sum(accuracies.values()) / len(accuracies)},
        "meta": {
            "seed": 42,
            "fusion_bench_version": "test",
            "torch_version": "test",
            "fast_dev_run": False,
            "hydra": {
                "choices": {
                    "method": method,
                    "modelpool": "CLIPVisionModelPool/mini-clip_TA8",
                    "taskpool": "CLIPVisionModelTaskPool/mini-clip_TA8",
                }
            },
            "config": {"seed": 42, "method": {"_target_": f"x.{method}", **params}},
        },
    }


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("results")
    for i, lam in enumerate((0.1, 0.3, 0.5)):
        (folder / f"ta_{i}.json").write_text(
            json.dumps(_report("task_arithmetic", {"svhn": 0.5 + lam / 2, EVIL_TASK: 0.4}, scaling_factor=lam))
        )
    (folder / "avg.json").write_text(json.dumps(_report("simple_average", {"svhn": 0.61, EVIL_TASK: 0.45})))
    (tmp_path_factory.getbasetemp() / "secret.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def server(results_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The server: (base URL, token, the process, its runs folder); stopped with SIGINT (Ctrl-C) after the module."""
    workdir = tmp_path_factory.mktemp("webui")
    cmd = [
        sys.executable,
        "-m",
        "fusion_bench.webui",
        "--port",
        "0",
        "--results",
        str(results_dir),
        "--runs-dir",
        str(workdir / "runs"),
    ]
    start = time.perf_counter()
    with sigint_not_ignored():
        proc = subprocess.Popen(
            cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ)
        )
    line = proc.stdout.readline()
    match = re.fullmatch(r"fusion_bench_webui: serving on (http://127\.0\.0\.1:\d+)/\?token=([\w-]+)\n", line)
    assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
    base, token = match.groups()
    assert _request(base, "GET", "/api/config")[0] == 200
    print(f"server ready in {time.perf_counter() - start:.2f} s")
    yield base, token, proc, workdir / "runs"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out == "fusion_bench_webui: stopped\n" and "Traceback" not in err, (out, err)


def _request(
    base: str, method: str, path: str, body: dict | None = None, headers: dict | None = None
) -> tuple[int, bytes]:
    """A raw request: ``path`` is sent as written (no ``..`` normalisation, unlike a browser)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"chromium not found at {CHROMIUM}: CI must install it (apt-get install -y chromium)")
        pytest.skip(f"chromium not found at {CHROMIUM}")
    sync_api = (
        pytest.importorskip("playwright.sync_api")
        if os.environ.get("CI") != "true"
        else __import__("playwright.sync_api").sync_api
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    # the page's Content-Security-Policy forbids eval, which Playwright's wait_for_function uses; escaping
    # alone must keep a report's strings as text, so the tests run without that second line of defence
    context = browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True)
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.dialogs = dialogs
    yield page
    context.close()


def _screenshot(page, name: str) -> None:
    if os.environ.get("FUSION_BENCH_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(SCREENSHOTS / f"webui_{name}.png"), full_page=False)


def test_compose_by_clicking_run_and_see_the_report(server, page) -> None:
    base, token, *_ = server
    page.goto(f"{base}/?token={token}")
    assert "token" not in page.url  # the token leaves the address bar (shared links do not carry it)
    page.select_option("#group-method", "task_arithmetic")
    scaling = page.locator('input[data-key="method.scaling_factor"]')
    scaling.click()
    scaling.fill("0.3")
    page.locator('input[data-key="fast_dev_run"]').fill("true")
    command = "fusion_bench method=task_arithmetic method.scaling_factor=0.3 fast_dev_run=true"
    assert page.locator("#command").inner_text() == command
    page.wait_for_function("document.getElementById('yaml').textContent.includes('TaskArithmeticAlgorithm')")
    yaml = page.locator("#yaml").inner_text()
    assert "scaling_factor: 0.3" in yaml and "fast_dev_run: true" in yaml
    assert page.url == f"{base}/?method=task_arithmetic&method.scaling_factor=0.3&fast_dev_run=true"
    _screenshot(page, "compose")
    page.click("#start-run")
    page.wait_for_url(f"{base}/run**")
    page.wait_for_selector("#runs-table .state-running, #runs-table .state-done", timeout=30_000)
    assert page.locator("#runs-table td.argv").first.inner_text().startswith(command + " report_save_path=")
    # the CLI prints its first line when the evaluation ends: over a minute on 2 busy cores
    page.wait_for_function("document.getElementById('log').textContent.length > 0", timeout=240_000)
    _screenshot(page, "run")
    page.wait_for_url(re.compile(r".*/results\?report=.*"), timeout=240_000)
    page.wait_for_selector("#reports tr.highlight")
    row = page.locator("#reports tr.highlight").inner_text()
    assert "task_arithmetic" in row and "report.json" in row
    provenance = json.loads(page.locator("#provenance").inner_text())
    assert (
        provenance["fast_dev_run"] is True
        and provenance["seed"] == 42
        and provenance["config"]["method"]["scaling_factor"] == 0.3
    )
    page.wait_for_selector("body[data-charts-ready]")
    _screenshot(page, "results")


def test_url_state_and_the_cli_error(server, page) -> None:
    base, *_ = server
    from playwright.sync_api import expect

    from fusion_bench.scripts.cli import validate_overrides

    page.goto(f"{base}/?method=ties_merging&method.k=20")
    expect(page.locator("#command")).to_have_text("fusion_bench method=ties_merging method.k=20")
    expected = f"fusion_bench: error: {validate_overrides(['method=ties_merging', 'method.k=20'])}"
    assert "'method.k'" in expected
    expect(page.locator("#compose-error")).to_have_text(expected)
    expect(page.locator("#start-run")).to_be_disabled()
    page.goto(f"{base}/?method=nope")
    page.wait_for_function("document.getElementById('compose-error').textContent.includes(\"unknown method 'nope'\")")


def test_a_run_request_without_the_token_starts_nothing(server, page) -> None:
    base, token, *_ = server
    before = [r["id"] for r in json.loads(_request(base, "GET", "/api/runs")[1])["runs"]]
    body = {"overrides": ["method=dummy"]}
    assert _request(base, "POST", "/api/runs", body)[0] == 403
    assert _request(base, "POST", "/api/runs", body, {"X-FusionBench-Token": token[:-1] + "x"})[0] == 403
    assert _request(base, "POST", "/api/runs/x/cancel", {})[0] == 403
    page.goto(base + "/")  # the page of someone without the token (sessionStorage is per context)
    status = page.evaluate(
        "fetch('/api/runs', {method: 'POST', body: JSON.stringify({overrides: []})}).then(r => r.status)"
    )
    assert status == 403
    # the same runs (ids): a run of another test may still be going, its elapsed time changing
    assert [r["id"] for r in json.loads(_request(base, "GET", "/api/runs")[1])["runs"]] == before


def test_files_outside_the_results_folders_are_refused(server, results_dir) -> None:
    base, *_ = server
    assert _request(base, "GET", "/files/0/avg.json")[0] == 200
    for path in (
        "/files/0/../secret.json",
        "/files/0/..%2Fsecret.json",
        "/files/0/%2e%2e/secret.json",
        "/files//etc/passwd",
        "/files/0//etc/passwd",
        "/files/0/%2Fetc%2Fpasswd",
        "/files/9/avg.json",
    ):
        assert _request(base, "GET", path)[0] == 404, path


def _svg_texts(svg: bytes) -> list[str]:
    """The text of each ``<text>`` element of an SVG document; fails on a script or an event attribute."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    for node in root.iter():
        assert not node.tag.endswith(("script", "foreignObject")), node.tag
        assert not [a for a in node.attrib if a.lower().startswith("on")], node.attrib
        assert not [v for k, v in node.attrib.items() if k.endswith("href") and not v.startswith("#")], node.attrib
    return ["".join(node.itertext()) for node in root.iter("{http://www.w3.org/2000/svg}text")]


def test_a_task_named_script_shows_as_text(server, page) -> None:
    base, *_ = server
    page.goto(f"{base}/results")
    page.wait_for_selector("body[data-results-ready]")
    headers = page.locator('table[data-table="methods"] th').all_inner_texts()
    assert EVIL_TASK in headers
    page.wait_for_selector("body[data-charts-ready]")
    # the charts are images (which run no script), and the task's name is one <text> element's text in each
    srcs = page.locator("figure.chart img").evaluate_all("imgs => imgs.map(i => i.getAttribute('src'))")
    assert len(srcs) == 2 and all(re.fullmatch(r"/charts/[0-9a-f]{20}\.svg", s) for s in srcs), srcs
    status, bars = _request(base, "GET", srcs[0])
    assert status == 200 and EVIL_TASK in _svg_texts(bars)
    # drawn by plotly.js on request, the name is text too
    page.locator('figure[data-chart="bars"] figcaption button').click()
    page.wait_for_selector('figure[data-chart="bars"] .main-svg')
    ticks = page.locator('figure[data-chart="bars"] .xtick text').all_text_contents()
    assert EVIL_TASK in ticks, ticks
    assert page.evaluate("window.__pwned") is None and page.dialogs == []
    assert page.evaluate("[...document.scripts].map(s => s.src.replace(location.origin, ''))") == [
        "/static/app.js",
        "/static/plotly.min.js",
    ]


def test_results_page_preloads_its_data_and_loads_plotly_only_on_request(server, page) -> None:
    base, *_ = server
    import importlib.util

    status, body = _request(base, "GET", "/static/plotly.min.js")
    package_file = Path(importlib.util.find_spec("plotly").origin).parent / "package_data" / "plotly.min.js"
    assert status == 200 and body == b"//# allFunctionsCalledOnLoad\n" + package_file.read_bytes()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    response = page.goto(f"{base}/results")
    assert response.headers["link"] == "</api/results>; rel=preload; as=fetch; crossorigin"
    assert "link" not in page.goto(f"{base}/").headers
    page.goto(f"{base}/results")
    page.wait_for_selector("body[data-charts-ready]")
    fetched = page.evaluate("performance.getEntriesByType('resource').map(e => e.name.replace(location.origin, ''))")
    charts = [f for f in fetched if f.startswith("/charts/")]
    assert fetched.count("/api/results") == 1 and len(charts) == len(set(charts)) == 2, fetched
    assert "/static/plotly.min.js" not in fetched and page.evaluate("window.Plotly") is None
    for i in range(2):  # both charts made interactive: plotly.js is loaded once
        page.locator("figure.chart figcaption button").first.click()
        page.wait_for_selector(f"figure.chart[data-interactive] >> nth={i}")
    fetched = page.evaluate("performance.getEntriesByType('resource').map(e => e.name.replace(location.origin, ''))")
    assert fetched.count("/static/plotly.min.js") == 1 and page.locator("figure.chart .js-plotly-plot").count() == 2
    # charts, static or drawn by plotly.js, ask nothing of another server (no CDN, no font download)
    assert requested and all(url.startswith(base + "/") for url in requested), requested


def test_chart_images_are_served_by_key_only(server) -> None:
    base, *_ = server
    payload = json.loads(_request(base, "GET", "/api/results")[1])
    url = payload["charts"][0]["url"]
    status, body = _request(base, "GET", url)
    assert status == 200 and body.startswith(b"<?xml") and b"<svg" in body
    key = url.removeprefix("/charts/").removesuffix(".svg")
    for path in (
        f"/charts/{key}",
        f"/charts/{key[:-1]}0.svg" if key[-1] != "0" else f"/charts/{key[:-1]}1.svg",
        f"/charts/{key.upper()}.svg",
        f"/charts/../charts/{key}.svg",
        "/charts/..%2Fapp.py",
        "/charts/%2Fetc%2Fpasswd",
    ):
        assert _request(base, "GET", path)[0] == 404, path


def test_sortable_table_sweep_and_side_by_side(server, page, results_dir) -> None:
    base, _, _, runs_dir = server
    page.goto(f"{base}/results")
    page.wait_for_selector("body[data-results-ready]")
    table = page.locator('table[data-table="methods"]')

    def lambdas() -> list[str]:  # λ of this module's reports, in row order (a run started by another test may be there)
        labels = table.locator("tbody tr td:first-child").all_inner_texts()
        return [
            m.group(1)
            for m in (
                re.match(r"task_arithmetic \(scaling_factor=(0\.\d)\)", t) for t in labels if "report.json" not in t
            )
            if m
        ]

    table.locator("th button", has_text="avg").click()  # a number column: best first
    assert lambdas() == ["0.5", "0.3", "0.1"]
    table.locator("th button", has_text="avg").click()
    assert lambdas() == ["0.1", "0.3", "0.5"]
    page.wait_for_selector("body[data-charts-ready]")
    assert "scaling_factor" in page.locator("#sweeps h2").inner_text()
    sweep = page.locator("#sweeps img").get_attribute("src")
    texts = _svg_texts(_request(base, "GET", sweep)[1])
    assert "scaling_factor" in texts and "task_arithmetic" in texts and "simple_average" not in texts
    page.select_option("#cmp-a", label="simple_average")
    page.select_option("#cmp-b", label="task_arithmetic (scaling_factor=0.5)")
    svhn = page.locator("#compare tr", has_text="svhn").locator("td").all_inner_texts()
    assert svhn == ["svhn", "61.0", "75.0", "+14.0"]
    folders = [str(p) for p in (results_dir, runs_dir) if p.exists()]
    out = runs_dir.parent / "report_out"
    cmd = [sys.executable, "-m", "fusion_bench.scripts.report", *folders, "--out", str(out), "--no-figures"]
    report = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    exports = page.locator("#exports pre").all_text_contents()  # tables.md, then each table's md, csv, tex
    assert exports[0] + "\n" == report.stdout and exports[0] == (out / "tables.md").read_text()
    assert exports[2:4] == [(out / "methods.csv").read_text(), (out / "methods.tex").read_text()]


def test_queue_and_cancel(server) -> None:
    base, token, *_ = server
    headers = {"X-FusionBench-Token": token}
    status, body = _request(base, "POST", "/api/runs", {"overrides": ["method=nope"]}, headers)
    assert status == 400 and json.loads(body)["error"].startswith("fusion_bench: error: unknown method 'nope'")
    first = json.loads(_request(base, "POST", "/api/runs", {"overrides": ["method=dummy"]}, headers)[1])
    second = json.loads(_request(base, "POST", "/api/runs", {"overrides": ["method=dummy"]}, headers)[1])
    assert json.loads(_request(base, "GET", f"/api/runs/{second['id']}")[1])["state"] == "queued"
    for run in (first, second):
        assert _request(base, "POST", f"/api/runs/{run['id']}/cancel", {}, headers)[0] == 200
    deadline = time.time() + 30
    while time.time() < deadline:
        states = [json.loads(_request(base, "GET", f"/api/runs/{r['id']}")[1])["state"] for r in (first, second)]
        if states == ["cancelled", "cancelled"]:
            break
        time.sleep(0.2)
    assert states == ["cancelled", "cancelled"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--host", "0.0.0.0"],
            "fusion_bench_webui: error: --host '0.0.0.0' is not a loopback address; add --allow-remote to serve other machines",
        ),
        (["--port", "http"], "fusion_bench_webui: error: argument --port: invalid int value: 'http'"),
        (
            ["--results", "/nonexistent/results"],
            "fusion_bench_webui: error: --results '/nonexistent/results': no such folder",
        ),
        (["--colour"], "fusion_bench_webui: error: unrecognized arguments: --colour"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fusion_bench.webui", *args], capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", message + "\n")


def test_start_up_imports_no_heavy_library(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from fusion_bench.webui.server import parse_args; import uvicorn; "
        "from fusion_bench.webui.app import Settings, create_app; create_app(Settings('t', [], Path('r'))); "
        "print(sorted(m for m in ('torch', 'transformers', 'lightning', 'hydra', 'plotly', 'matplotlib') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[]\n"


def test_a_foreign_host_name_is_refused(server) -> None:
    base, *_ = server
    assert _request(base, "GET", "/api/results", headers={"Host": "attacker.example:80"})[0] == 400
    assert _request(base, "GET", "/api/results", headers={"Host": "localhost"})[0] == 200


def test_options_with_their_defaults_and_comments() -> None:
    from fusion_bench.webui.configs import parse_options

    text = (
        "# Header line one.\n# two.\n_target_: x.Y\nalpha: 0.5   # λ, '#' not a comment start\nname: 'a # b'  # quoted\n"
        "nested:\n  k: 1\nlong: null  # first part\n  # second part\n"
    )
    header, options = parse_options(text)
    assert header == "Header line one. two."
    assert [o.as_dict() for o in options] == [
        {"key": "alpha", "default": "0.5", "comment": "λ, '#' not a comment start", "nested": False},
        {"key": "name", "default": "'a # b'", "comment": "quoted", "nested": False},
        {"key": "nested", "default": "", "comment": "", "nested": True},
        {"key": "long", "default": "null", "comment": "first part second part", "nested": False},
    ]


def test_an_extra_config_dir_is_offered_and_validated(tmp_path: Path) -> None:
    from fusion_bench.scripts.cli import compose_config, validate_overrides
    from fusion_bench.webui.configs import ConfigTree

    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "my_average.yaml").write_text(
        "# My average.\n_target_: fusion_bench.method.SimpleAverageAlgorithm\nweight: 2  # unused\n"
    )
    tree = ConfigTree(tmp_path)
    assert "my_average" in tree.choices("method") and "task_arithmetic" in tree.choices("method")
    assert tree.options("method", "my_average") == {
        "description": "My average.",
        "options": [{"key": "weight", "default": "2", "comment": "unused", "nested": False}],
    }
    assert validate_overrides(["method=my_average"], str(tmp_path)) is None
    assert compose_config(["method=my_average"], str(tmp_path)).method.weight == 2
    assert "unknown method 'my_average'" in validate_overrides(["method=my_average"])


def _tables_for_charts():
    from fusion_bench.reporting.tables import Row, Table

    averages = [50.0, None, 70.0, 70.0, *[10.0 + i for i in range(10)]]  # 14 rows; two tie at 70
    methods = Table(
        "methods",
        "accuracy (%) of each method",
        ["a", EVIL_TASK, "avg"],
        [Row(f"m{i}", [1.0 * i, None, avg]) for i, avg in enumerate(averages)],
    )
    sweep = Table("sweep_scaling_factor", "avg against scaling_factor", ["0.1", "0.3"], [Row("ta", [1.0, 2.0])])
    sweep.x = [0.1, 0.3]
    return methods, sweep


def test_chart_specs_show_the_best_rows_and_each_sweep() -> None:
    from fusion_bench.reporting.tables import Table
    from fusion_bench.webui.charts import COLORS, chart_specs

    methods, sweep = _tables_for_charts()
    bars, lines = chart_specs([methods, sweep])
    # by average, best first (ties in table order, no average last); 12 of the 14 rows
    assert [s["label"] for s in bars["series"]] == ["m2", "m3", "m0", *[f"m{i}" for i in range(13, 4, -1)]]
    assert bars["categories"] == ["a", EVIL_TASK] and bars["series"][0]["values"] == [2.0, None]
    assert bars["title"] == "the 12 best rows by average" and bars["ylabel"] == "accuracy (%)"
    assert [s["color"] for s in bars["series"]] == list(COLORS[:12])
    assert lines == {
        "id": "sweep_scaling_factor",
        "kind": "lines",
        "heading": "avg against scaling_factor",
        "title": "",
        "x": [0.1, 0.3],
        "xlabel": "scaling_factor",
        "ylabel": "average accuracy (%)",
        "series": [{"label": "ta", "values": [1.0, 2.0], "color": COLORS[0]}],
    }
    assert chart_specs([Table("by_x_1", "t", ["a", "avg"], methods.rows)]) == []  # no chart table: no chart


def test_chart_colours_are_matplotlibs_tab10_then_their_light_partners() -> None:
    import matplotlib
    from matplotlib.colors import to_hex

    from fusion_bench.webui.charts import COLORS

    tab20 = [to_hex(c) for c in matplotlib.colormaps["tab20"].colors]
    assert list(COLORS) == tab20[0::2] + tab20[1::2]


def test_chart_svg_keeps_every_string_as_text() -> None:
    from fusion_bench.webui.charts import chart_specs, figure_size_px, render_svg

    methods, sweep = _tables_for_charts()
    methods.rows[2].label = "cost $5 & $x$ <b>"
    bars, lines = chart_specs([methods, sweep])
    svg = render_svg(bars)
    texts = _svg_texts(svg)
    assert EVIL_TASK in texts and "cost $5 & $x$ <b>" in texts and "the 12 best rows by average" in texts
    assert b"<script" not in svg and render_svg(bars) == svg  # the same spec, the same bytes
    width, height = figure_size_px(bars)
    size_pt = re.search(rb'<svg [^>]*width="([\d.]+)pt" height="([\d.]+)pt"', svg).groups()
    assert [round(float(v) * 96 / 72) for v in size_pt] == [width, height]  # the size the page reserves
    assert {"ta", "scaling_factor", "average accuracy (%)"} <= set(_svg_texts(render_svg(lines)))


def test_chart_store_renders_once_by_key_and_keeps_the_newest() -> None:
    from fusion_bench.webui.charts import ChartStore, chart_key, chart_specs, render_svg

    bars, lines = chart_specs(list(_tables_for_charts()))
    store = ChartStore(size=1)
    try:
        store.prepare(lambda: [bars])
        key = chart_key(bars)
        store._pool.submit(lambda: None).result()  # the preparation has run (one worker, in order)
        assert store.svg(key) == render_svg(bars) and store.add(bars) == key
        assert store.svg("0" * 20) is None
        assert store.svg(store.add(lines)) == render_svg(lines) and store.svg(key) is None  # one kept
    finally:
        store.close()


def test_the_charts_are_prepared_after_the_first_answer_only() -> None:
    import asyncio
    import concurrent.futures

    from fusion_bench.webui.app import _AfterFirstAnswer

    calls: list[int] = []
    seen: list[tuple[str, int]] = []  # (request type, hook calls when the app ran)

    async def app(scope, receive, send) -> None:
        seen.append((scope["type"], len(calls)))

    middleware = _AfterFirstAnswer(app, hook=lambda: calls.append(1))

    async def requests() -> None:
        for kind in ("lifespan", "http", "http"):
            await middleware({"type": kind}, None, None)

    # a thread of its own: the module's browser (Playwright's sync API) may hold this thread's event loop
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, requests()).result()
    assert seen == [("lifespan", 0), ("http", 0), ("http", 1)] and calls == [1]
