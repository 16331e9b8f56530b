"""Safe file output: every write goes to a temporary sibling first, then is renamed into place.

One mechanism for every output of FusionBench (reports, merged models, checkpoints, figures, CSVs):

* :func:`check_output_path` checks an output option *before any work*: the path resolves, is not
  under a file, its nearest existing folder is writable, a file option does not name a folder and
  a folder option does not name a file. Errors are :class:`~fusion_bench.errors.ConfigError`
  naming the option.
* :func:`atomic_write` writes a file through a temporary sibling ``.NAME.<pid>.XXXX.tmp``.
* :func:`atomic_directory` writes a folder through a temporary sibling. A new folder is renamed
  into place; an existing folder receives only the new entries, and only when everything in it
  was written by an earlier FusionBench save (listed in its :data:`MARKER` file), or is empty, or
  ``overwrite=True`` (then entries of the same name are replaced and others are kept). A file is
  never replaced by a folder.
* Temporary siblings left by a killed run (their process is gone) are removed by the next write
  to the same path.
* Files and folders get the modes the umask gives (not the owner-only modes of ``tempfile``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from fusion_bench.errors import ConfigError

__all__ = [
    "atomic_write",
    "atomic_write_json",
    "atomic_directory",
    "check_output_path",
    "check_finite_json",
    "clean_stale_temporaries",
    "overwrite_allowed",
    "read_json_file",
    "MARKER",
]

MARKER = ".fusion_bench_output.json"  # lists what a FusionBench save wrote into its folder
_OVERWRITE: contextvars.ContextVar[bool] = contextvars.ContextVar("fusion_bench_overwrite", default=False)
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


@contextlib.contextmanager
def overwrite_allowed(allowed: bool = True) -> Iterator[None]:
    """Within the block, :func:`atomic_directory` calls without ``overwrite`` take ``allowed`` (the
    run's ``overwrite=true``)."""
    token = _OVERWRITE.set(allowed)
    try:
        yield
    finally:
        _OVERWRITE.reset(token)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``path`` whose writing process no longer runs; return them."""
    path = Path(path)
    removed = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            match = _TMP.match(entry.name)
            if match and match["name"] == path.name and not _pid_alive(int(match["pid"])):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists() or parent.is_symlink():
            return parent
    return Path("/")


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, not guessed: root, read-only mounts, /proc)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".fusion_bench_probe.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def check_output_path(value: str | os.PathLike, *, option: str, kind: str = "file", overwrite: bool = False) -> Path:
    """Resolve and check an output path before any work; return it absolute.

    Args:
        value: the path given.
        option: the option's name, quoted in messages.
        kind: ``"file"`` or ``"folder"`` (a model, a log or checkpoint folder).
        overwrite: for a folder, accept one holding files FusionBench did not write.

    Raises:
        ConfigError: naming the option and the path.
    """
    path = Path(os.path.expanduser(str(value))).absolute()
    where = f"{option}={str(value)!r}"
    existing = _nearest_existing(path)
    if existing != path:
        if not existing.is_dir():
            raise ConfigError(f"{where}: {str(existing)!r} is a file, so nothing can be written under it")
        if not _writable(existing):
            raise ConfigError(f"{where}: folder {str(existing)!r} is not writable")
        return path
    if not _writable(path.parent):
        raise ConfigError(f"{where}: folder {str(path.parent)!r} is not writable")
    if kind == "file" and path.is_dir():
        raise ConfigError(f"{where} is an existing folder; give a file path")
    if kind == "folder":
        if not path.is_dir():
            raise ConfigError(f"{where} is an existing file; a folder would replace it (give another path)")
        foreign = foreign_entries(path)
        if foreign and not overwrite:
            shown = ", ".join(repr(n) for n in foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ConfigError(
                f"{where} holds files FusionBench did not write ({shown}); give an empty or new folder, "
                f"or add overwrite=true to write into it anyway"
            )
    return path


def _marker_entries(folder: Path) -> list[str] | None:
    try:
        entries = json.loads((folder / MARKER).read_text(encoding="utf-8"))["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [e for e in entries if isinstance(e, str) and "/" not in e and e not in ("", ".", "..")]


def foreign_entries(folder: Path) -> list[str]:
    """The entries of ``folder`` that no earlier FusionBench save listed in its marker."""
    ours = set(_marker_entries(folder) or ())
    return sorted(p.name for p in folder.iterdir() if p.name != MARKER and p.name not in ours)


def _chmod_tree(root: Path) -> None:
    """Give ``root`` and everything under it the modes a plain ``open``/``mkdir`` would (the umask)."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            with contextlib.suppress(OSError):
                file = os.path.join(dirpath, name)
                if not os.path.islink(file):
                    os.chmod(file, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs: Any) -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success rename it onto ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched. An existing
    folder at ``path`` is never replaced.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a folder; cannot write a file there")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json_file(path: str | os.PathLike, *, what: str) -> Any:
    """The JSON in ``path``; a file that is not valid JSON is a one-line error naming ``what`` and the path.

    Raises:
        ModelLoadError: the file cannot be read or is not valid JSON.
    """
    from fusion_bench.errors import ModelLoadError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{what}: cannot read {str(path)!r} ({err.__class__.__name__})") from None
    try:
        return json.loads(text)
    except ValueError as err:
        raise ModelLoadError(f"{what}: {str(path)!r} is not valid JSON ({err})") from None


def check_finite_json(obj: Any, where: str = "report") -> None:
    """Raise ``ValueError`` naming the first NaN/Inf number in ``obj`` (JSON has none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj!r}, which JSON cannot hold")
    if isinstance(obj, dict):
        for key, value in obj.items():
            check_finite_json(value, f"{where}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_finite_json(value, f"{where}[{i}]")


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 2) -> Path:
    """Write ``obj`` as strict JSON (no NaN/Inf) to ``path`` atomically and return the path."""
    check_finite_json(obj)
    text = json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False) + "\n"
    with atomic_write(path, "w", encoding="utf-8") as f:
        f.write(text)
    return Path(path)


def _move_into(tmp: Path, path: Path, entries: Iterable[str], previous: Iterable[str]) -> None:
    """Move ``entries`` of ``tmp`` into the existing folder ``path``; remove the ``previous`` save's
    entries that the new save lacks. The marker lists both while entries move."""
    entries, previous = list(entries), list(previous)
    _write_marker(path, sorted({*entries, *previous}))
    for name in entries:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    for name in set(previous) - set(entries):
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    _write_marker(path, entries)
    shutil.rmtree(tmp, ignore_errors=True)


def _write_marker(folder: Path, entries: list[str]) -> None:
    text = json.dumps({"written_by": "fusion_bench", "entries": sorted(entries)}, indent=1) + "\n"
    with atomic_write(folder / MARKER, "w", encoding="utf-8") as f:
        f.write(text)


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike, *, overwrite: bool | None = None, option: str = "output folder"
) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it becomes ``path`` (see module docstring).

    Args:
        path: the folder to write.
        overwrite: write into an existing folder holding files FusionBench did not write
            (entries of the same name are replaced, the others kept); None: as
            :func:`overwrite_allowed` says (default no).
        option: names the path in messages.

    Raises:
        ConfigError: ``path`` is a file, or a folder holding other files (without ``overwrite``).
    """
    path = Path(path)
    if overwrite is None:
        overwrite = _OVERWRITE.get()
    if path.exists():
        check_output_path(path, option=option, kind="folder", overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        entries = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
        _chmod_tree(tmp)
        if path.exists():
            _move_into(tmp, path, entries, _marker_entries(path) or [])
        else:
            _write_marker(tmp, entries)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
