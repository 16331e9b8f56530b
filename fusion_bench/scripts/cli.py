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
from fusion_bench.scripts.override_hints import list_index_override_error

__all__ = ["main", "CONFIG_DIR", "config_choices"]

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


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    """The config ``config_name`` composed with ``overrides`` (no run)."""
    from hydra import compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=overrides)


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
    error = unknown_group_choice(sys.argv[1:]) or list_index_override_error(sys.argv[1:], _compose)
    if error is not None:
        print(f"fusion_bench: error: {error}", file=sys.stderr)
        sys.exit(2)
    register_resolvers()
    _app()


if __name__ == "__main__":
    main()
