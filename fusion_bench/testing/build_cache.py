"""Build-once cache folders: a builder runs into a temporary sibling folder, which is renamed into place
with a marker (its format and options); a folder whose marker matches is reused, concurrent builds are safe."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["MARKER", "build_once"]

MARKER = ".complete"


def _read_marker(root: Path) -> dict[str, Any] | None:
    """The content of ``root/.complete``, or ``None`` when absent or unreadable."""
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _move_into_place(tmp: Path, root: Path, marker: dict[str, Any]) -> None:
    """Rename the built ``tmp`` to ``root``, replacing a stale example; tolerate a concurrent winner.

    Args:
        tmp: the complete build (a sibling of ``root``).
        root: the destination; must be absent, empty or hold an example (``.complete``).
        marker: the marker of the build, to recognise a concurrent identical build.
    """
    if root.exists() and any(root.iterdir()):
        if _read_marker(root) is None:
            raise FileExistsError(f"{root} exists, is not empty and holds no complete example; not replacing it")
        stale = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
        os.replace(root, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:
        if _read_marker(root) != marker:  # not a concurrent build of the same example
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def build_once(root: Path, marker: dict[str, Any], build: Callable[[Path], None]) -> None:
    """Build a fixture folder once: reuse ``root`` if its marker equals ``marker``, else ``build``
    into a temporary sibling, write the marker last and rename the result into place.

    Args:
        root: the destination folder (absolute).
        marker: what identifies a complete build (format version, seed, contents).
        build: fills the folder it is given.
    """
    if _read_marker(root) == marker:
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.build.", dir=root.parent))
    try:
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
        _move_into_place(tmp, root, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
