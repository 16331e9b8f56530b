"""Build components (methods, pools) from configs, with errors that name the option.

A component config is one of:
  * ``{_target_: dotted.path.Class, **kwargs}`` (Hydra style), or
  * ``{<key>: registered_name, **kwargs}`` with ``key`` = ``name`` for methods and
    ``type`` for pools (the older FusionBench style).
Nested configs are passed as plain containers, never instantiated eagerly: pools load
their models lazily.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from fusion_bench.errors import ConfigError
from fusion_bench.utils.registry import Registry

__all__ = ["to_container", "instantiate_component", "call_with_options", "resolve_target"]


def to_container(cfg: Any) -> Any:
    """Resolve interpolations and return plain dicts/lists (non-config values pass through)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def resolve_target(target: str, *, what: str) -> Any:
    """Import ``target`` (``pkg.module.Name``) or raise a :class:`ConfigError` naming ``what``."""
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as err:  # ImportError, AttributeError, hydra's own wrappers
        raise ConfigError(f"{what}: cannot import _target_ {target!r} ({err.__class__.__name__}: {err})") from None


def call_with_options(fn: Any, options: Mapping[str, Any], *, what: str) -> Any:
    """Call ``fn(**options)`` after checking every option is a parameter of ``fn``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None and not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        valid = [n for n, p in sig.parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"{what}: unknown option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(valid)}"
            )
        missing = [
            n
            for n, p in sig.parameters.items()
            if p.default is p.empty and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n not in options
        ]
        if missing:
            raise ConfigError(f"{what}: missing required option(s) {', '.join(map(repr, missing))}")
    return fn(**options)


def instantiate_component(cfg: Any, registry: Registry, *, key: str, what: str) -> Any:
    """Instantiate a method/pool config (see module docstring).

    Args:
        cfg: the component's config (DictConfig or mapping).
        registry: where legacy ``key:`` names are looked up.
        key: ``"name"`` for methods, ``"type"`` for pools.
        what: the config group, used in messages (``"method"``, ``"modelpool"``).
    """
    if cfg is None:
        raise ConfigError(f"no {what} given: pass {what}=<name> on the command line")
    options = dict(to_container(cfg))
    options.pop("_recursive_", None)
    options.pop("_convert_", None)
    target = options.pop("_target_", None)
    if target is not None:
        factory = resolve_target(target, what=what)
        label = f"{what} {target.rsplit('.', 1)[-1]!r}"
    elif key in options:
        name = options.pop(key)
        factory = registry.get(str(name))
        label = f"{what} {name!r}"
    else:
        raise ConfigError(f"{what} config needs '_target_' or '{key}'; got keys {sorted(options)}")
    return call_with_options(factory, options, what=label)
