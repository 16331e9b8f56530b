"""Reading checkpoint files safely: safetensors, weights-only ``torch.load``, and opt-in pickles.

A ``.safetensors`` file or a ``torch.save`` d state dict holds only tensors and is read without
running code (``safetensors`` / ``torch.load(weights_only=True)``). A pickle of Python objects
(the task_vectors checkpoints: whole ``ImageEncoder`` / ``ClassificationHead`` objects) can run
arbitrary code while loading, so :func:`load_pickle_file` is only called when the user opted in
(``allow_pickle: true``). Classes the pickle names are imported through ``redirects`` first
(e.g. ``src.modeling`` of the task_vectors repository, or open_clip 2.0's ``VisualTransformer``);
a class that still cannot be imported is a :class:`~fusion_bench.errors.ModelLoadError` naming the
module, not a traceback from deep inside ``pickle``.
"""

from __future__ import annotations

import pickle
import re
import types
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from fusion_bench.errors import ModelLoadError

__all__ = ["PickleRequiredError", "is_safetensors_file", "load_state_dict_file", "load_pickle_file", "Redirect"]

# (module, name) -> the object to use instead; or a callable (module, name) -> object | None
Redirect = Callable[[str, str], Any]


class PickleRequiredError(ModelLoadError):
    """The file is a pickle of Python objects, not a plain state dict."""


def is_safetensors_file(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file (by its name)."""
    return str(path).endswith(".safetensors")


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ModelLoadError(f"{what}: file {str(path)!r} does not exist")


def _as_state_dict(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]  # {"state_dict": ..., other metadata}
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{what}: {str(path)!r} does not hold a state dict (a mapping of name -> tensor)")
    return dict(obj)


def load_state_dict_file(path: str | Path, *, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``torch.save`` d dict, without running code.

    Args:
        path: the file.
        what: names the checkpoint in messages.

    Returns:
        ``{name: tensor}`` on CPU (``.pt`` files memory-mapped where their format allows).

    Raises:
        PickleRequiredError: the file pickles Python objects (``allow_pickle`` is needed).
        ModelLoadError: missing or unreadable file, or not a state dict.
    """
    path = Path(path).expanduser()
    _check_file(path, what)
    if is_safetensors_file(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own SafetensorError
            raise ModelLoadError(f"{what}: cannot read safetensors file {str(path)!r} ({err})") from None
    try:
        obj = _torch_load_weights_only(path)
    except pickle.UnpicklingError as err:
        raise PickleRequiredError(
            f"{what}: {str(path)!r} is a pickle of Python objects, not a state dict, and loading it runs code "
            f"from the file; if you trust it set allow_pickle: true (e.g. modelpool.allow_pickle=true), "
            f"or convert it once to safetensors ({_pickle_reason(err)})"
        ) from None
    except (OSError, RuntimeError, EOFError) as err:
        raise ModelLoadError(f"{what}: cannot read {str(path)!r} ({err.__class__.__name__}: {err})") from None
    return _as_state_dict(obj, path, what)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _pickle_reason(err: Exception) -> str:
    """The part of torch's refusal that says what the pickle holds, as plain text (torch's message
    is many lines with terminal escape codes): e.g. ``unsupported global: GLOBAL mod.Class``."""
    text = " ".join(_ANSI.sub("", str(err)).split())
    found = re.search(r"Unsupported (global|operand): (GLOBAL )?[\w.<>]+", text)
    if found:
        return f"it needs {found.group(0)[len('Unsupported ') :].replace('GLOBAL ', '')}"
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return sentence.rstrip(".") or err.__class__.__name__


def _torch_load_weights_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:  # legacy (non-zip) files cannot be memory-mapped
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _unpickler_module(redirect: Redirect | None, path: Path, what: str) -> types.ModuleType:
    """A stand-in ``pickle`` module whose ``Unpickler`` resolves classes through ``redirect``."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if redirect is not None:
                found = redirect(module, name)
                if found is not None:
                    return found
            try:
                return super().find_class(module, name)  # with pickle's Python 2 name fixes
            except (ImportError, AttributeError) as err:
                raise ModelLoadError(
                    f"{what}: the pickle {str(path)!r} needs {module}.{name}, which cannot be imported "
                    f"({err.__class__.__name__}: {err}); install the package that defines it, or load a "
                    f"state dict (safetensors) of the checkpoint instead"
                ) from None

    module = types.ModuleType("fusion_bench_unpickler")
    module.Unpickler = Unpickler  # type: ignore[attr-defined]
    module.load = pickle.load  # type: ignore[attr-defined]
    module.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    return module


def load_pickle_file(path: str | Path, *, what: str, redirect: Redirect | None = None) -> Any:
    """Unpickle ``path`` with ``torch.load(weights_only=False)`` (runs code: only when opted in).

    Args:
        path: the pickle.
        what: names the checkpoint in messages.
        redirect: ``(module, name) -> object | None``: replacements for classes the pickle names.

    Returns:
        the unpickled object.

    Raises:
        ModelLoadError: missing file, a class that cannot be imported, or a corrupt pickle.
    """
    path = Path(path).expanduser()
    _check_file(path, what)
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_unpickler_module(redirect, path, what)
        )
    except ModelLoadError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError) as err:
        raise ModelLoadError(f"{what}: cannot unpickle {str(path)!r} ({err.__class__.__name__}: {err})") from None
