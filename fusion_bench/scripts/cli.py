"""The ``fusion_bench`` command: a Hydra app over the configs shipped in the package.

    fusion_bench method=<name> modelpool=<group/name> taskpool=<group/name> [key=value ...]

Errors caused by the input are printed as one line (``fusion_bench: error: ...``) with exit
status 2, before any model is loaded where possible.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fusion_bench.errors import FusionBenchError
from fusion_bench.example import register_resolvers

__all__ = ["main", "CONFIG_DIR", "config_choices", "compose_config", "validate_overrides"]

CONFIG_DIR = Path(str(resources.files("fusion_bench") / "config"))
GROUPS = ("method", "modelpool", "taskpool", "fabric")


def config_choices(group: str) -> list[str]:
    """The config names of ``group`` shipped in the package (``a/b`` for nested folders)."""
    root = CONFIG_DIR / group
    return sorted(
        str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not p.name.startswith("_")
    )


def unknown_group_choice(args: list[str]) -> str | None:
    """The error for a ``group=unknown`` override, or None (Hydra's own message is a page long)."""
    if any(a.startswith(("--config-dir", "-cd", "hydra.searchpath")) for a in args):
        return None  # configs may come from elsewhere: let Hydra decide
    for arg in args:
        key, sep, value = arg.lstrip("+~").partition("=")
        if not sep or key not in GROUPS or value in ("", "null"):
            continue
        known = config_choices(key)
        for choice in value.split(","):
            if choice not in known:
                return f"unknown {key} {choice!r}. Known: {', '.join(known)}"
    return None


def compose_config(overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """The root config composed from ``overrides`` with Hydra's compose API, as the CLI would
    (``config_dir``: an extra config folder searched first, like ``--config-dir``).

    Raises:
        hydra.errors.HydraException: the overrides do not compose.
    """
    from hydra import compose, initialize_config_dir

    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("fusion_bench_config", overrides=[*extra, *overrides])


def _unknown_key_error(err: Exception, overrides: list[str], config_dir: str | None) -> str | None:
    """``unknown option 'method.k'`` (with the close matches) for Hydra's "Key 'k' is not in struct"."""
    import difflib

    from omegaconf import OmegaConf

    cause = getattr(err, "__cause__", None)
    full_key = getattr(cause, "full_key", None)
    if not full_key or "not in struct" not in str(cause):
        return None
    parent, _, key = str(full_key).rpartition(".")
    rest = [o for o in overrides if not o.lstrip("+~").startswith(f"{full_key}=")]
    try:
        node = compose_config(rest, config_dir)
        node = OmegaConf.select(node, parent) if parent else node
    except Exception:  # noqa: BLE001 - only the hint is lost
        node = None
    known = [str(k) for k in node.keys()] if node is not None and hasattr(node, "keys") else []
    close = difflib.get_close_matches(key, known, n=3)
    hint = f"; did you mean {' or '.join(repr(f'{parent}.{c}' if parent else c) for c in close)}?" if close else ""
    return f"unknown option {full_key!r}{hint} (prefix with + to add a new key)"


def validate_overrides(overrides: list[str], config_dir: str | None = None) -> str | None:
    """The CLI's one-line error for ``overrides`` (without the ``fusion_bench: error:`` prefix), or None.

    The same checks as the command, before any model is loaded: unknown group members, then
    Hydra's composition (unknown options, bad syntax).
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = [*(["--config-dir", config_dir] if config_dir else []), *overrides]
    error = unknown_group_choice(args)
    if error is not None:
        return error
    try:
        compose_config(overrides, config_dir)
    except (HydraException, OmegaConfBaseException) as err:
        return _unknown_key_error(err, overrides, config_dir) or " ".join(str(err).split("\n")[0].split())
    return None


@hydra.main(config_path="../config", config_name="fusion_bench_config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from fusion_bench.program import FabricModelFusionProgram

    try:
        FabricModelFusionProgram(cfg).run()
    except FusionBenchError as err:
        print(f"fusion_bench: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Entry point of the ``fusion_bench`` command."""
    error = unknown_group_choice(sys.argv[1:])
    if error is not None:
        print(f"fusion_bench: error: {error}", file=sys.stderr)
        sys.exit(2)
    register_resolvers()
    _app()


if __name__ == "__main__":
    main()
