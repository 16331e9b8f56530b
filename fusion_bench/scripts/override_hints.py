"""Hints for overrides whose shape does not fit the chosen config (before Hydra's own page-long error).

``modelpool.models.0.path=...`` addresses the older list form of a pool (``type: huggingface_clip_vision`` +
``models: [{name, path}]``). On a pool that names its models (``models: {_pretrained_: {...}, sun397: ...}``)
the same intent is ``modelpool.models._pretrained_.pretrained_model_name_or_path=...``.
"""

from __future__ import annotations

import re
from typing import Mapping

LIST_INDEX = re.compile(r"^modelpool\.models\.(\d+)(?:\.([\w.]+))?=")


def list_index_override_error(args: list[str], compose) -> str | None:
    """The one-line error for ``modelpool.models.<i>...=`` on a dict-form pool, or None.

    Args:
        args: the command line's overrides.
        compose: ``(config_name, overrides) -> composed config`` (called only when such an override is present).
    """
    hits = [(a, LIST_INDEX.match(a)) for a in args]
    hits = [(a, m) for a, m in hits if m]
    if not hits:
        return None
    config_name, others, rest = "fusion_bench_config", [], iter(args)
    for a in rest:
        if a in ("--config-name", "-cn"):
            config_name = next(rest, config_name)
        elif a.startswith("--config-name="):
            config_name = a.partition("=")[2]
        elif not a.startswith("-") and not LIST_INDEX.match(a):
            others.append(a)
    try:
        models = compose(config_name, others).modelpool.get("models")
    except Exception:  # noqa: BLE001 - Hydra reports other problems itself
        return None
    if not isinstance(models, Mapping):
        return None
    arg, match = hits[0]
    names = [str(n) for n in models]
    index = int(match.group(1))
    name = names[index] if index < len(names) else (names[0] if names else "_pretrained_")
    field = "pretrained_model_name_or_path" if match.group(2) in (None, "path") else match.group(2)
    key = arg.partition("=")[0]
    return (
        f"{key!r}: this modelpool names its models ({', '.join(names)}), it is not a list; "
        f"use modelpool.models.{name}.{field}=... ({key.split('.', 2)[0]}.models.<i>.path= works on the "
        f"list form, type: huggingface_clip_vision)"
    )
