"""The Starlette application: the page, its JSON API, its charts (SVG images), and files under the results folders.

Reads (``GET``) are open to whoever can reach the server; every state-changing request
(``POST``) needs the header ``X-FusionBench-Token`` and comes from a loopback client.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fusion_bench.webui.charts import ChartStore, figure_size_px
from fusion_bench.webui.configs import GROUPS, ConfigTree
from fusion_bench.webui.results import results_payload, safe_file
from fusion_bench.webui.runs import RunQueue

__all__ = ["Settings", "create_app", "TOKEN_HEADER"]

TOKEN_HEADER = "X-FusionBench-Token"
STATIC = Path(str(resources.files("fusion_bench.webui") / "static"))
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# the same request (URL, mode, credentials) as app.js makes for the Results view, so that it reuses the answer
RESULTS_PRELOAD = "</api/results>; rel=preload; as=fetch; crossorigin"
COMPILE_HINT = b"//# allFunctionsCalledOnLoad\n"
CHART_NAME = re.compile(r"([0-9a-f]{20})\.svg")
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; object-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_COMPOSE_LOCK = threading.Lock()  # Hydra's compose API keeps global state


@dataclass
class Settings:
    """What the command line chose."""

    token: str
    results: list[Path]
    runs_dir: Path
    config_dir: str | None = None
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1")  # Host headers served ("*": any)


def _plotly_js() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("plotly")
    assert spec is not None and spec.origin is not None, "the plotly package is a dependency of fusion_bench"
    return Path(spec.origin).parent / "package_data" / "plotly.min.js"


@functools.lru_cache(maxsize=1)
def _plotly_bytes() -> bytes:
    """The plotly package's ``plotly.min.js`` as served (the page loads it when a chart is made interactive):
    the file unchanged, after one comment line, V8's explicit compile hint. With it, Chromium compiles all
    of plotly.js on a background thread as the file downloads, instead of each function on the page's main
    thread when it is first called. Measured in Chromium's trace with 200 reports: 0.35 s less CPU on the
    main thread, 0.25 s more on a background one (other browsers read a comment)."""
    return COMPILE_HINT + _plotly_js().read_bytes()


class _AfterFirstAnswer:
    """ASGI middleware: calls ``hook`` once, after the first HTTP request has been answered (work that can
    wait does not hold back the server's first answer)."""

    def __init__(self, app: ASGIApp, hook: Callable[[], None]) -> None:
        self.app, self.hook = app, hook
        self.called = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
        if scope["type"] == "http" and not self.called:
            self.called = True
            self.hook()


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status_code=status, headers=SECURITY_HEADERS)


def _overrides(request: Request) -> list[str]:
    return [o for o in request.query_params.getlist("o") if o.strip()]


def create_app(settings: Settings) -> Starlette:
    """The application serving ``settings``."""
    tree = ConfigTree(settings.config_dir)
    queue = RunQueue(settings.runs_dir, settings.config_dir)
    roots = [*settings.results, settings.runs_dir]
    charts = ChartStore()

    def authorised(request: Request) -> bool:
        token = request.headers.get(TOKEN_HEADER, "")
        client = request.client.host if request.client else ""
        return hmac.compare_digest(token.encode(), settings.token.encode()) and client in LOOPBACK

    async def page(request: Request) -> Response:
        headers = dict(SECURITY_HEADERS)
        if request.url.path == "/results":  # the browser asks for the view's data before app.js has run
            headers["Link"] = RESULTS_PRELOAD
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=headers)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "plotly.min.js":
            # 4.6 MB that only changes with the plotly package: cached, so a repeated visit skips loading and compiling it
            cache = {"Cache-Control": "private, max-age=86400"}
            return Response(_plotly_bytes(), media_type="text/javascript", headers={**SECURITY_HEADERS, **cache})
        if name not in STATIC_FILES:
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name], headers=SECURITY_HEADERS)

    def config(request: Request) -> Response:
        groups = {g: {"choices": tree.choices(g), "default": d} for g, d in tree.defaults().items()}
        return _json({"groups": groups, "order": list(GROUPS), "root": tree.options("", "")})

    def options(request: Request) -> Response:
        found = tree.options(request.query_params.get("group", ""), request.query_params.get("name", ""))
        return _json(found) if found is not None else _json({"error": "unknown config"}, 404)

    def compose(request: Request) -> Response:
        from omegaconf import OmegaConf

        from fusion_bench.scripts.cli import compose_config, validate_overrides

        overrides = _overrides(request)
        with _COMPOSE_LOCK:
            error = validate_overrides(overrides, settings.config_dir)
            yaml = "" if error else OmegaConf.to_yaml(compose_config(overrides, settings.config_dir))
        return _json({"overrides": overrides, "error": error and f"fusion_bench: error: {error}", "yaml": yaml})

    async def start_run(request: Request) -> Response:
        if not authorised(request):
            return _json({"error": f"forbidden: a run needs the {TOKEN_HEADER} header from this machine"}, 403)
        try:
            body = await request.json()
            overrides = [str(o) for o in body["overrides"]]
        except (ValueError, KeyError, TypeError):
            return _json({"error": 'the body must be {"overrides": [...]}'}, 400)
        from starlette.concurrency import run_in_threadpool

        from fusion_bench.scripts.cli import validate_overrides

        def check() -> str | None:
            with _COMPOSE_LOCK:
                return validate_overrides(overrides, settings.config_dir)

        error = await run_in_threadpool(check)
        if error:
            return _json({"error": f"fusion_bench: error: {error}"}, 400)
        return _json(queue.submit(overrides).as_dict(), 201)

    def list_runs(request: Request) -> Response:
        return _json({"runs": [r.as_dict(len(r.log)) for r in queue.runs.values()]})

    def get_run(request: Request) -> Response:
        run = queue.runs.get(request.path_params["run_id"])
        if run is None:
            return _json({"error": "no such run"}, 404)
        since = request.query_params.get("since", "0")
        return _json(run.as_dict(int(since) if since.isdigit() else 0))

    async def cancel_run(request: Request) -> Response:
        if not authorised(request):
            return _json({"error": f"forbidden: cancelling needs the {TOKEN_HEADER} header from this machine"}, 403)
        from starlette.concurrency import run_in_threadpool

        run = await run_in_threadpool(queue.cancel, request.path_params["run_id"])
        return _json(run.as_dict(len(run.log))) if run else _json({"error": "no such run"}, 404)

    def results(request: Request) -> Response:
        payload = results_payload(roots)
        for chart in payload["charts"]:  # rendering starts now, while the page draws its tables
            width, height = figure_size_px(chart)
            chart.update(url=f"/charts/{charts.add(dict(chart))}.svg", width=width, height=height)
        return _json(payload)

    def chart(request: Request) -> Response:
        name = CHART_NAME.fullmatch(request.path_params["name"])
        try:
            svg = charts.svg(name.group(1)) if name else None
        except Exception as err:  # noqa: BLE001 - matplotlib refused the data: one line for the page's log
            return PlainTextResponse(f"the chart could not be drawn: {err}", status_code=500, headers=SECURITY_HEADERS)
        if svg is None:
            return PlainTextResponse("not found", status_code=404, headers=SECURITY_HEADERS)
        # the address names the content: a browser may keep the image
        cache = {"Cache-Control": "private, max-age=86400"}
        return Response(svg, media_type="image/svg+xml", headers={**SECURITY_HEADERS, **cache})

    def files(request: Request) -> Response:
        path = safe_file(roots, request.path_params["link"])
        if path is None:
            return PlainTextResponse("not found", status_code=404, headers=SECURITY_HEADERS)
        media = {".json": "application/json", ".png": "image/png"}.get(path.suffix, "text/plain; charset=utf-8")
        return FileResponse(path, media_type=media, headers={**SECURITY_HEADERS, "Content-Disposition": "inline"})

    routes = [
        Route("/", page),
        Route("/run", page),
        Route("/results", page),
        Route("/static/{name}", static),
        Route("/api/config", config),
        Route("/api/options", options),
        Route("/api/compose", compose),
        Route("/api/runs", start_run, methods=["POST"]),
        Route("/api/runs", list_runs),
        Route("/api/runs/{run_id}", get_run),
        Route("/api/runs/{run_id}/cancel", cancel_run, methods=["POST"]),
        Route("/api/results", results),
        Route("/charts/{name}", chart),
        Route("/files/{link:path}", files),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        queue.close()  # stop the runs still going when the server stops
        charts.close()

    # a page elsewhere cannot read this one through a DNS name pointed at 127.0.0.1 (DNS rebinding)
    middleware = [
        Middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts)),
        # the charts of the results folders are drawn in the background once the server has answered
        Middleware(_AfterFirstAnswer, hook=lambda: charts.prepare(lambda: results_payload(roots)["charts"])),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.queue = queue
    return app
