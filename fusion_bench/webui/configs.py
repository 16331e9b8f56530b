"""The config tree the page composes from: group members, each option's default and comment."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["GROUPS", "ConfigTree", "Option", "parse_options"]

#: the groups the page offers, with the default member ("" for Hydra's own default)
GROUPS = ("method", "modelpool", "taskpool", "fabric", "hydra/launcher")
ROOT_CONFIG = "fusion_bench_config"
_KEY_LINE = re.compile(r"^([A-Za-z_][\w-]*):(.*)$")


@dataclass
class Option:
    """One top-level key of a config file."""

    key: str
    default: str  # the value as YAML text ("" for a nested block)
    comment: str
    nested: bool

    def as_dict(self) -> dict[str, Any]:
        return {"key": self.key, "default": self.default, "comment": self.comment, "nested": self.nested}


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment), ignoring ``#`` inside quotes."""
    quote = ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1 :].strip()
    return text.strip(), ""


def parse_options(text: str) -> tuple[str, list[Option]]:
    """The header comment and the top-level options of a YAML config file.

    A comment is the one on the key's line plus the comment-only lines indented under it;
    ``defaults`` and ``_target_`` are not options.
    """
    lines = text.splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line.lstrip("# ").rstrip())
    options: list[Option] = []
    for line in lines:
        match = _KEY_LINE.match(line)
        if match:
            value, comment = _split_comment(match.group(2))
            options.append(Option(match.group(1), value, comment, value == ""))
        elif options and line[:1].isspace() and line.strip().startswith("#"):
            options[-1].comment = f"{options[-1].comment} {line.strip().lstrip('# ')}".strip()
    skip = {"defaults", "_target_", "hydra"}
    return " ".join(h for h in header if h), [o for o in options if o.key not in skip and not o.key.startswith("_")]


class ConfigTree:
    """The shipped config folder plus an optional ``--config-dir`` (searched first, as Hydra does)."""

    def __init__(self, config_dir: str | Path | None = None) -> None:
        self.shipped = Path(str(resources.files("fusion_bench") / "config"))
        self.extra = Path(config_dir).resolve() if config_dir else None

    @property
    def roots(self) -> list[Path]:
        return [r for r in (self.extra, self.shipped) if r is not None]

    def choices(self, group: str) -> list[str]:
        """The members of ``group`` (``a/b`` for nested folders), from every root."""
        names: set[str] = set()
        for root in self.roots:
            folder = root / group
            if folder.is_dir():
                names |= {
                    str(p.relative_to(folder).with_suffix(""))
                    for p in folder.rglob("*.yaml")
                    if not p.name.startswith("_")
                }
        return sorted(names)

    def defaults(self) -> dict[str, str]:
        """The root config's default member of each group ("" where Hydra picks its own)."""
        from omegaconf import OmegaConf

        root = OmegaConf.load(self._file("", ROOT_CONFIG))
        out = {group: "" for group in GROUPS}
        for entry in root.get("defaults", []):
            if isinstance(entry, str) or not hasattr(entry, "items"):
                continue
            for group, name in entry.items():
                group = str(group).removeprefix("override ").strip()
                if group in out:
                    out[group] = str(name)
        return out

    def _file(self, group: str, name: str) -> Path | None:
        for root in self.roots:
            path = (root / group / f"{name}.yaml") if group else root / f"{name}.yaml"
            if path.is_file():
                return path
        return None

    def options(self, group: str, name: str) -> dict[str, Any] | None:
        """``{"description", "options"}`` of a group member (``group=""``: the root options); None if unknown."""
        if group and (group not in GROUPS or name not in self.choices(group)):
            return None
        path = self._file(group, name if group else ROOT_CONFIG)
        if path is None:
            return None
        description, options = parse_options(path.read_text(encoding="utf-8"))
        return {"description": description, "options": [o.as_dict() for o in options]}
