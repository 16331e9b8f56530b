"""Progress display: bars on a terminal, silence otherwise (logs, pipes, CI)."""

from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator, TypeVar

__all__ = ["on_terminal", "quiet_unless_terminal", "progress"]

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether stderr (where bars go) is a terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def quiet_unless_terminal() -> None:
    """Turn off the Hugging Face libraries' own bars (e.g. "Loading weights") when not on a terminal.

    Nothing is imported for it: a library not imported yet reads the environment variables when it is
    (transformers and huggingface_hub ``HF_HUB_DISABLE_PROGRESS_BARS``, datasets
    ``HF_DATASETS_DISABLE_PROGRESS_BARS``); one already imported is told directly.
    """
    if on_terminal():
        return
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        try:
            sys.modules["transformers"].utils.logging.disable_progress_bar()
        except Exception:  # noqa: BLE001 - an old transformers: nothing to quiet
            pass
    if "datasets" in sys.modules:
        try:
            sys.modules["datasets"].disable_progress_bars()
        except Exception:  # noqa: BLE001
            pass
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def progress(
    items: Iterable[T], *, desc: str, total: int | None = None, leave: bool = False, **kwargs: Any
) -> Iterator[T]:
    """``tqdm(items)`` on a terminal, ``items`` as they are otherwise."""
    if not on_terminal():
        yield from items
        return
    import shutil

    from tqdm.auto import tqdm

    width = shutil.get_terminal_size().columns  # COLUMNS, the terminal's, or 80 where it reports 0
    yield from tqdm(items, desc=desc, total=total, leave=leave, ncols=min(width, 120), **kwargs)
