"""The ``fusion_bench_webui`` command.

    fusion_bench_webui [--host 127.0.0.1] [--port 7860] [--config-dir DIR] [--results DIR ...]

Prints one URL carrying an access token and serves until Ctrl-C. Bad flags are one line
(``fusion_bench_webui: error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import secrets
import socket
import sys
from pathlib import Path
from typing import NoReturn, Sequence

__all__ = ["main", "parse_args"]

PROG = "fusion_bench_webui"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: str) -> NoReturn:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command's options; every check that needs no server is done here."""
    parser = _Parser(
        prog=PROG, description="A web page to compose fusion_bench runs, watch them, and compare their results."
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; another needs --allow-remote)"
    )
    parser.add_argument("--allow-remote", action="store_true", help="allow --host to be a non-loopback address")
    parser.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0: a free one)")
    parser.add_argument(
        "--config-dir", default=None, help="an extra config folder, searched before the shipped configs"
    )
    parser.add_argument(
        "--results", nargs="+", default=[], metavar="DIR", help="folders of JSON reports for the Results view"
    )
    parser.add_argument(
        "--runs-dir", default="outputs/webui", help="where runs started from the page write (default: outputs/webui)"
    )
    args = parser.parse_args(argv)
    if not _is_loopback(args.host) and not args.allow_remote:
        _fail(f"--host {args.host!r} is not a loopback address; add --allow-remote to serve other machines")
    if not 0 <= args.port <= 65535:
        _fail(f"--port {args.port}: must be in 0..65535")
    if args.config_dir is not None and not Path(args.config_dir).is_dir():
        _fail(f"--config-dir {args.config_dir!r}: no such folder")
    for folder in args.results:
        if not Path(folder).is_dir():
            _fail(f"--results {folder!r}: no such folder")
    if Path(args.runs_dir).exists() and not Path(args.runs_dir).is_dir():
        _fail(f"--runs-dir {args.runs_dir!r}: not a folder")
    return args


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        _fail(f"cannot listen on {host}:{port}: {err.strerror or err}")
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``fusion_bench_webui``."""
    args = parse_args(argv)
    import uvicorn

    from fusion_bench.webui.app import Settings, create_app

    token = secrets.token_urlsafe(24)
    hosts = ("127.0.0.1", "localhost", "::1") if _is_loopback(args.host) else ("*",)
    settings = Settings(
        token, [Path(r).resolve() for r in args.results], Path(args.runs_dir).resolve(), args.config_dir, hosts
    )
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    config = uvicorn.Config(
        create_app(settings), log_level="warning", access_log=False, timeout_graceful_shutdown=3, lifespan="on"
    )
    server = uvicorn.Server(config)
    print(f"{PROG}: serving on http://{shown}:{port}/?token={token}", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    print(f"{PROG}: stopped", flush=True)


if __name__ == "__main__":
    main()
