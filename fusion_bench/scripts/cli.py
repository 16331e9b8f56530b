"""The ``fusion_bench`` command: a Hydra app over the configs shipped in the package.

    fusion_bench method=<name> modelpool=<group/name> taskpool=<group/name> [key=value ...]

Errors caused by the input are printed as one line (``fusion_bench: error: ...``) with exit
status 2, before any model is loaded: the command line is parsed and the config composed (with
Hydra's own parser and composer) before the Hydra app starts, so an unknown key, group or config
name is reported in that form, with a did-you-mean from the real keys. Ctrl-C prints one line and
exits with status 130 (no report is written).
"""

from __future__ import annotations

import difflib
import functools
import os
import sys
import warnings
from importlib import resources
from pathlib import Path
from typing import Sequence

import hydra
from omegaconf import DictConfig

from fusion_bench.errors import FusionBenchError
from fusion_bench.example import register_resolvers
from fusion_bench.scripts.override_hints import list_index_override_error

__all__ = ["main", "CONFIG_DIR", "config_choices", "check_command_line", "compose_config", "validate_overrides", "HELP"]

CONFIG_DIR = Path(str(resources.files("fusion_bench") / "config"))
GROUPS = ("method", "modelpool", "taskpool", "fabric")
EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130
_FLAGS_WITH_VALUE = (
    "--config-name",
    "-cn",
    "--config-path",
    "-cp",
    "--config-dir",
    "-cd",
    "--package",
    "-p",
    "--experimental-rerun",
    "--shell-completion",
    "-sc",
)
_PASS_THROUGH = (
    "--hydra-help",
    "--info",
    "-i",
    "--cfg",
    "-c",
    "--resolve",
    "--version",
    "--shell-completion",
    "-sc",
    "--experimental-rerun",
    "--config-dir",
    "-cd",
    "--config-path",
    "-cp",
)


class InputError(FusionBenchError):
    """A command-line error found before the run (unknown key, group, config name...)."""


def config_choices(group: str) -> list[str]:
    """The config names of ``group`` shipped in the package (``a/b`` for nested folders)."""
    root = CONFIG_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if not p.name.startswith("_"))


def _did_you_mean(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}" if close else ""


def _did_you_mean_choice(choice: str, known: Sequence[str]) -> str:
    """`` Did you mean 'a/b'`` for a config choice: compared with the choices in the same folder, by name."""
    folder, _, name = choice.rpartition("/")
    same_folder = {k.rpartition("/")[2]: k for k in known if k.rpartition("/")[0] == folder}
    close = difflib.get_close_matches(name, list(same_folder), n=1, cutoff=0.6)
    return f" Did you mean {same_folder[close[0]]!r}" if close else ""


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
                hint = _did_you_mean_choice(choice, known)
                return f"unknown {key} {choice!r}.{hint + '?' if hint else ''} Known: {', '.join(known)}"
    return None


HELP = f"""usage: fusion_bench [-m] [--json] [--config-name NAME] [key=value ...]

Merge models (method) from a model pool, evaluate the result on a task pool, write a JSON report.
  fusion_bench method=task_arithmetic                      # the built-in offline benchmark
  fusion_bench -m method=task_arithmetic method.scaling_factor=0.2,0.4   # a sweep, one job per value

options that matter:
  method=NAME                  the fusion method (list below); its options: method.<option>=VALUE
  modelpool=GROUP/NAME         the models to merge (default: the built-in mini CLIP, offline)
  taskpool=GROUP/NAME          the evaluation tasks (taskpool=dummy: no evaluation)
  report_save_path=PATH        the JSON report (default: <run folder>/report.json; false: none)
  merged_model_save_path=DIR   save the merged model there (a new folder, or one FusionBench wrote)
  overwrite=true               allow writing a model into a folder holding other files
  fast_dev_run=true            evaluate one batch per task (a smoke test)
  seed=INT                     seeds python, numpy and torch (default 42)
  fabric.accelerator=cpu|gpu   where to run; fabric.devices=N for N devices
  --json                       print the JSON report on stdout (the summary goes to stderr)
  -m, --multirun               run every combination of comma-separated values
  --config-name NAME           another root config: {", ".join(p.stem for p in sorted(CONFIG_DIR.glob("*.yaml")))}

Errors in the input are one line on stderr with exit status 2; Ctrl-C exits with 130.
Hydra's own help: fusion_bench --hydra-help.  Full config: fusion_bench --cfg job
"""


def help_text() -> str:
    """:data:`HELP`, then the config groups and their choices."""
    lines = [HELP, "config groups (group=choice):"]
    for group in GROUPS:
        lines.append(f"  {group}: {', '.join(config_choices(group))}")
    return "\n".join(lines)


def _split_command_line(args: Sequence[str]) -> tuple[dict[str, str | bool], list[str]]:
    """``(flags, overrides)`` of the command line (flags: Hydra's ``-m``, ``--config-name``...)."""
    flags: dict[str, str | bool] = {}
    overrides: list[str] = []
    items = list(args)
    while items:
        arg = items.pop(0)
        if arg.startswith("-"):
            name, sep, value = arg.partition("=")
            if name in _FLAGS_WITH_VALUE:
                flags[name] = value if sep else (items.pop(0) if items else "")
            else:
                flags[name] = True
        else:
            overrides.append(arg)
    return flags, overrides


def _flags_first(args: list[str]) -> list[str]:
    """The command line with Hydra's flags (``-m``, ``--config-name X``...) before the overrides, where
    Hydra's parser needs them (``fusion_bench method=x -m`` works too)."""
    flags: list[str] = []
    overrides: list[str] = []
    items = list(args)
    while items:
        arg = items.pop(0)
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        flags.append(arg)
        if arg in _FLAGS_WITH_VALUE and items:
            flags.append(items.pop(0))
    return [*flags, *overrides]


def _root_config_name(flags: dict[str, str | bool]) -> str:
    name = flags.get("--config-name", flags.get("-cn", "fusion_bench_config"))
    return str(name).removesuffix(".yaml")


def _dotted_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    from omegaconf import OmegaConf

    keys = []
    for key in cfg.keys():
        name = f"{prefix}{key}"
        keys.append(name)
        if (
            not OmegaConf.is_interpolation(cfg, key)
            and not OmegaConf.is_missing(cfg, key)
            and isinstance(cfg[key], DictConfig)
        ):
            keys += _dotted_keys(cfg[key], f"{name}.")
    return keys


def _unknown_key(cfg: DictConfig, key: str) -> str | None:
    """The error for overriding ``key`` when ``cfg`` lacks it, else None."""
    from omegaconf import OmegaConf

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if isinstance(node, DictConfig) and leaf in node:
        return None
    if node is not None and not isinstance(node, DictConfig):
        return None  # lists and the like: let the composer judge
    siblings = [f"{parent}.{k}" if parent else str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
    hint = _did_you_mean(key, siblings) or _did_you_mean(key, _dotted_keys(cfg))
    where = (
        f"{parent!r} has: {', '.join(str(k) for k in node.keys())}" if isinstance(node, DictConfig) and parent else ""
    )
    if hint:
        return f"unknown option {key!r}{hint}?"
    return f"unknown option {key!r}: the config has no such key" + (
        f" ({where})" if where else " (see fusion_bench --help)"
    )


def _compose(config_name: str, overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """``config_name`` composed with ``overrides`` as Hydra will (``config_dir``: searched first, as ``--config-dir``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name, overrides=[*extra, *overrides])


def compose_config(overrides: list[str], config_dir: str | None = None) -> DictConfig:
    """The root config composed from ``overrides`` with Hydra's compose API, as the CLI would
    (``config_dir``: an extra config folder searched first, like ``--config-dir``).

    Raises:
        hydra.errors.HydraException: the overrides do not compose.
    """
    return _compose("fusion_bench_config", list(overrides), config_dir)


def validate_overrides(overrides: list[str], config_dir: str | None = None) -> str | None:
    """The CLI's one-line error for ``overrides`` (without the ``fusion_bench: error:`` prefix), or None:
    :func:`check_command_line`, with ``config_dir`` searched first (the web page's ``--config-dir``)."""
    return check_command_line(overrides, config_dir=config_dir)


def _first_combination(overrides: list[str]) -> list[str]:
    """Every override with a sweep (``a=1,2``) replaced by its first value."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    batches = BasicSweeper.split_arguments(parsed, 1)
    return list(batches[0][0]) if batches and batches[0] else list(overrides)


def _unparsable(overrides: list[str]) -> str | None:
    """The first override Hydra's parser rejects, quoted."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for override in overrides:
        try:
            parser.parse_overrides([override])
        except OverrideParseException:
            return repr(override)
    return None


def check_command_line(args: Sequence[str], config_dir: str | None = None) -> str | None:
    """The one-line error of a command line that cannot start a run (None: it can).

    Parses the overrides and composes the config as Hydra will; an unknown key is reported
    with the closest real key, an unknown config name with the known ones. ``config_dir``: a config
    folder searched before the shipped one (its group members are then judged by the composer).
    """
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException

    flags, overrides = _split_command_line(args)
    if any(f in flags for f in _PASS_THROUGH) or any(o.startswith("hydra.searchpath") for o in overrides):
        return None  # another config source or a Hydra info command: Hydra answers
    compose = functools.partial(_compose, config_dir=config_dir)
    error = None if config_dir else unknown_group_choice(overrides)
    error = error or list_index_override_error(list(args), compose)
    if error is not None:
        return error
    name = _root_config_name(flags)
    roots = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    if name not in roots:
        hint = _did_you_mean(name, roots)
        return f"unknown --config-name {name!r}{hint + '?' if hint else '.'} Known: {', '.join(roots)}"
    mine = [o for o in overrides if not o.lstrip("+~").startswith("hydra")]
    try:
        combination = _first_combination(mine)
    except OverrideParseException as err:
        return f"cannot parse {_unparsable(mine) or 'the command line'}: {str(err).splitlines()[0]}"
    try:
        compose(name, combination)
        return None
    except (ConfigCompositionException, MissingConfigException, HydraException) as err:
        return _explain_composition_error(name, combination, err, compose)


def _is_group_override(override: str) -> bool:
    key = override.partition("=")[0]
    return not override.startswith(("+", "~")) and (key in GROUPS or "/" in key)


def _explain_composition_error(name: str, overrides: list[str], err: Exception, compose=_compose) -> str:
    """Our message for a failed composition: the first override naming a key the config lacks."""
    groups = [o for o in overrides if _is_group_override(o)]
    try:
        base = compose(name, groups)
    except Exception:  # noqa: BLE001 - the group choices themselves fail: Hydra's first line
        base = None
    if base is not None:
        for override in overrides:
            key, sep, _ = override.partition("=")
            key = key.lstrip("~")
            if override.startswith("+") or (not sep and not override.startswith("~")) or key in GROUPS or "/" in key:
                continue
            message = _unknown_key(base, key)
            if message is not None:
                return message
    first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return f"invalid command line: {first}"


@hydra.main(config_path="../config", config_name="fusion_bench_config", version_base="1.3")
def _app(cfg: DictConfig) -> None:
    from fusion_bench.program import FabricModelFusionProgram

    try:
        FabricModelFusionProgram(cfg).run()
    except FusionBenchError as err:
        _fail(str(err))
    except Exception as err:
        if _caused_by_interrupt(err):  # e.g. Ctrl-C inside a class body: Python wraps it in a RuntimeError
            raise KeyboardInterrupt from None
        raise


def _caused_by_interrupt(err: BaseException) -> bool:
    """Whether a KeyboardInterrupt is in ``err``'s chain of causes and contexts."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _fail(message: str) -> None:
    print(f"fusion_bench: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    sys.exit(EXIT_INPUT_ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``fusion_bench`` command (``argv``: the arguments, default ``sys.argv[1:]``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--help" in args or "-h" in args:
        try:
            print(help_text(), flush=True)
        except BrokenPipeError:  # `fusion_bench --help | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if "--json" in args:
        args = [a for a in args if a != "--json"] + ["++print_json=true"]
    args = _flags_first(args)
    saved_argv = sys.argv
    warnings.filterwarnings("ignore", message=r"The `srun` command is available")  # not on a SLURM job: noise
    try:
        error = check_command_line(args)
        if error is not None:
            _fail(error)
        from fusion_bench.program.hydra_job import register_job_dir_resolver
        from fusion_bench.utils.progress import quiet_unless_terminal
        from fusion_bench.program.preflight import offline_unless_hub_reachable

        quiet_unless_terminal()
        offline_unless_hub_reachable()
        register_resolvers()
        register_job_dir_resolver()
        sys.argv = [saved_argv[0] if saved_argv else "fusion_bench", *args]
        _app()
    except KeyboardInterrupt:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while we exit changes nothing
        print("\nfusion_bench: interrupted (Ctrl-C); no report written", file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    finally:
        sys.argv = saved_argv


def run() -> None:
    """The ``fusion_bench`` command's process: :func:`main`, and after a Ctrl-C an immediate exit with status 130.

    After the interrupt's line the interpreter's own shutdown is skipped (logs and streams are flushed
    first; every output was already cleaned up while the interrupt unwound): the interpreter sometimes
    ended such a process by SIGINT instead of status 130 when the interrupt had landed inside library code.
    """
    try:
        main()
    except SystemExit as exit_:
        if exit_.code != EXIT_INTERRUPTED:
            raise
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    run()
