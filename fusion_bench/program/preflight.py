"""Checks of the run options made before any work: numbers, devices, and every output path.

Every output a run will write (``report_save_path``, ``merged_model_save_path`` and the method's own
save/checkpoint/log/CSV paths) is resolved and checked here, so a bad path costs a one-line
error (naming the option) instead of a finished merge and evaluation with nowhere to go.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from omegaconf import DictConfig, ListConfig, OmegaConf

from fusion_bench.errors import ConfigError
from fusion_bench.utils.io import check_output_path

__all__ = [
    "check_run_options",
    "check_fabric_options",
    "output_options",
    "check_outputs",
    "check_existing_report",
    "FILE_OPTIONS",
    "FOLDER_OPTIONS",
    "MODEL_FOLDER_OPTIONS",
]

# method options that name files the method writes
FILE_OPTIONS = (
    "save_to_csv",
    "save_merging_weights",
    "save_mask",
    "save_checkpoint",
    "checkpoint_path",
    "train_state_path",
)
# method options that name folders written through the library (logs, checkpoints, figures)
FOLDER_OPTIONS = ("checkpoint_dir", "log_dir", "output_dir")
# options that name a saved model folder (checked like merged_model_save_path)
MODEL_FOLDER_OPTIONS = ("save_path",)
_COUNTS = {"batch_size": 1, "num_workers": 0}  # wherever they appear (data loaders of pools and methods)
_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_run_options(config: DictConfig) -> None:
    """``seed``, ``fast_dev_run``, ``print_config``, ``overwrite``: parsed and range-checked.

    Raises:
        ConfigError: naming the option, the valid values and the value given.
    """
    seed = config.get("seed")
    if seed is not None and not (_is_int(seed) and 0 <= seed < 2**32):
        raise ConfigError(f"option 'seed' must be an integer in [0, 2**32) or null; got {seed!r}")
    fast = config.get("fast_dev_run", False)
    if not isinstance(fast, bool) and not (_is_int(fast) and fast >= 1):
        raise ConfigError(f"option 'fast_dev_run' must be true, false or a number of batches >= 1; got {fast!r}")
    for option in ("print_config", "overwrite", "print_json"):
        value = config.get(option, False)
        if not isinstance(value, bool):
            raise ConfigError(f"option {option!r} must be true or false; got {value!r}")
    for key, value in _leaves(config, ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"option {key!r} must be a finite number; got {value!r}")
        low = _COUNTS.get(key.rsplit(".", 1)[-1])
        if low is not None and value is not None and not (_is_int(value) and value >= low):
            raise ConfigError(f"option {key!r} must be an integer >= {low}; got {value!r}")


def _leaves(cfg: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf that is set and not an interpolation."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        keys = range(len(cfg)) if isinstance(cfg, ListConfig) else list(cfg.keys())
        for key in keys:
            name = f"{prefix}{key}" if isinstance(cfg, DictConfig) else f"{prefix[:-1]}[{key}]."
            if OmegaConf.is_missing(cfg, key) or OmegaConf.is_interpolation(cfg, key):
                continue
            value = cfg[key]
            if OmegaConf.is_config(value):
                yield from _leaves(value, name if name.endswith(".") else f"{name}.")
            else:
                yield name.rstrip("."), value


def check_fabric_options(config: DictConfig) -> None:
    """``fabric.devices`` and ``fabric.accelerator`` before Lightning sees them (its errors are pages long)."""
    fabric = config.get("fabric")
    if not isinstance(fabric, DictConfig):
        return
    accelerator = fabric.get("accelerator", "auto")
    if accelerator not in _ACCELERATORS:
        raise ConfigError(f"option 'fabric.accelerator' must be one of {', '.join(_ACCELERATORS)}; got {accelerator!r}")
    devices = OmegaConf.select(config, "method.devices", default=None) or fabric.get("devices", "auto")
    ok = (
        devices == "auto"
        or (_is_int(devices) and (devices >= 1 or devices == -1))
        or (
            isinstance(devices, (list, ListConfig)) and len(devices) > 0 and all(_is_int(d) and d >= 0 for d in devices)
        )
    )
    if not ok:
        raise ConfigError(
            f"option 'fabric.devices' must be 'auto', an integer >= 1 (-1: all) or a list of device indices; got {devices!r}"
        )
    if accelerator in ("gpu", "cuda"):
        import torch

        count = torch.cuda.device_count()
        wanted = len(devices) if isinstance(devices, (list, ListConfig)) else devices
        if count == 0:
            raise ConfigError(
                f"option 'fabric.accelerator={accelerator}': no CUDA GPU is available on this machine; use fabric.accelerator=cpu or auto"
            )
        if _is_int(wanted) and wanted > count:
            raise ConfigError(f"option 'fabric.devices={wanted}': only {count} GPU(s) are available")


def output_options(config: DictConfig) -> list[tuple[str, str, str]]:
    """``(option, path, kind)`` of every output path set in ``config``'s method (kind: file, folder, model)."""
    method = config.get("method")
    found: list[tuple[str, str, str]] = []
    if not isinstance(method, DictConfig):
        return found
    for key, value in _leaves(method, "method."):
        name = key.rsplit(".", 1)[-1]
        if not isinstance(value, str) or value in ("", "null", "none", "false"):
            continue
        if name in FILE_OPTIONS:
            found.append((key, value, "file"))
        elif name in FOLDER_OPTIONS:
            found.append((key, value, "folder"))
        elif name in MODEL_FOLDER_OPTIONS:
            found.append((key, value, "model"))
    return found


def check_existing_report(path: str, *, overwrite: bool) -> None:
    """Refuse a ``report_save_path`` that is an existing file other than a FusionBench report."""
    import json
    from pathlib import Path

    file = Path(path).expanduser()
    if overwrite or not file.is_file():
        return
    try:
        ours = isinstance(json.loads(file.read_text(encoding="utf-8")).get("meta"), dict)
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ConfigError(
            f"report_save_path={path!r} is an existing file that is not a FusionBench report; "
            "give another path, or add overwrite=true to replace it"
        )


def check_outputs(config: DictConfig, *, report_path: str | None, model_path: str | None) -> None:
    """Check every output path of the run (see module docstring); nothing is created."""
    overwrite = bool(config.get("overwrite", False))
    if report_path is not None:
        check_output_path(report_path, option="report_save_path", kind="file")
        check_existing_report(report_path, overwrite=overwrite)
    if model_path is not None:
        _check_model_folder(model_path, "merged_model_save_path", overwrite)
    for option, path, kind in output_options(config):
        if kind == "model":
            _check_model_folder(path, option, overwrite)
        elif kind == "folder":
            _check_folder(path, option)
        else:
            check_output_path(path, option=option, kind="file")


def _check_model_folder(path: str, option: str, overwrite: bool) -> None:
    from pathlib import Path

    check_output_path(
        path, option=option, kind="folder" if Path(path).expanduser().exists() else "file", overwrite=overwrite
    )


def _check_folder(path: str, option: str) -> None:
    from pathlib import Path

    if Path(path).expanduser().is_file():
        raise ConfigError(f"{option}={path!r} is an existing file; give a folder")
    check_output_path(path, option=option, kind="file" if not Path(path).expanduser().exists() else "dir")


def offline_unless_hub_reachable(timeout: float = 3.0) -> bool:
    """Without ``HF_HUB_OFFLINE``, try one connection to the hub; if it fails, switch the Hugging Face
    libraries to offline mode for this process (cached models still load, others fail at once with
    our one-line error instead of ~25 s of retries). Returns whether the hub is used online."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        _set_offline_constants()
        return False


def _set_offline_constants() -> None:
    """Tell already-imported Hugging Face modules (they read the variable at import)."""
    import sys

    for name, attr in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
        ("transformers.utils.hub", "_is_offline_mode"),
    ):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, attr):
            setattr(module, attr, True)
