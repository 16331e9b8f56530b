"""The model pool interface: a named set of models, loaded lazily, with their datasets."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from fusion_bench.data.loading import load_dataset_from_config, split_corruption_options
from fusion_bench.errors import ModelLoadError, ModelPoolError, UnknownNameError
from fusion_bench.modelpool.lazy_tensors import StateDictSource, TensorSource
from fusion_bench.utils.io import atomic_directory
from fusion_bench.utils.instantiate import call_with_options, resolve_target, to_container
from fusion_bench.utils.registry import Registry

__all__ = ["BaseModelPool", "MODELPOOLS", "register_modelpool", "PRETRAINED"]

MODELPOOLS: Registry["BaseModelPool"] = Registry("modelpool")
register_modelpool = MODELPOOLS.register

PRETRAINED = "_pretrained_"


def _is_special(name: str) -> bool:
    return name.startswith("_") and name.endswith("_")


class BaseModelPool:
    """Named models (``_pretrained_`` plus fine-tuned ones) and their datasets.

    Args:
        models: ``{name: entry}``. An entry is a ``nn.Module``, or a config with ``_target_``
            (called on load). Subclasses accept more forms (paths, hub ids).
        train_datasets / val_datasets / test_datasets: ``{task_name: dataset entry}``
            (see :mod:`fusion_bench.data.loading`).
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        *,
        train_datasets: Mapping[str, Any] | None = None,
        val_datasets: Mapping[str, Any] | None = None,
        test_datasets: Mapping[str, Any] | None = None,
    ) -> None:
        models = to_container(models)
        if not isinstance(models, Mapping) or not models:
            raise ModelPoolError(f"modelpool: 'models' must be a non-empty mapping of name -> model, got {models!r}")
        self._models: dict[str, Any] = {str(k): v for k, v in models.items()}
        self._datasets = {
            "train": dict(to_container(train_datasets) or {}),
            "val": dict(to_container(val_datasets) or {}),
            "test": dict(to_container(test_datasets) or {}),
        }
        for which, entries in self._datasets.items():  # corruption options are checked now, not at load
            for name, entry in entries.items():
                if isinstance(entry, Mapping):
                    split_corruption_options(entry, what=f"{which} dataset {name!r}")
        self._source_cache: tuple[str, TensorSource] | None = None

    # ---- names -------------------------------------------------------------------------
    @property
    def all_model_names(self) -> list[str]:
        """Every name, special ones (``_pretrained_``) included, in config order."""
        return list(self._models)

    @property
    def model_names(self) -> list[str]:
        """The fine-tuned models' names (special names like ``_pretrained_`` excluded), in config order."""
        return [n for n in self._models if not _is_special(n)]

    @property
    def has_pretrained(self) -> bool:
        return PRETRAINED in self._models

    def __len__(self) -> int:
        return len(self.model_names)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def get_model_config(self, name: str) -> Any:
        """The config entry of model ``name``."""
        if name not in self._models:
            raise UnknownNameError(f"model {name!r} is not in the pool; models: {', '.join(self._models)}")
        return self._models[name]

    # ---- models ------------------------------------------------------------------------
    def load_model(self, name: str) -> nn.Module:
        """Load model ``name`` (a fresh copy each call)."""
        entry = self.get_model_config(name)
        if isinstance(entry, nn.Module):
            return copy.deepcopy(entry)
        return self._load_model(name, entry)

    def _load_model(self, name: str, entry: Any) -> nn.Module:
        if isinstance(entry, Mapping) and "_target_" in entry:
            opts = dict(entry)
            fn = resolve_target(opts.pop("_target_"), what=f"model {name!r}")
            return call_with_options(fn, opts, what=f"model {name!r}")
        raise ModelPoolError(f"model {name!r}: {type(self).__name__} cannot load entry {entry!r}")

    def _load_checked_target(self, name: str, entry: Any, accepts: Callable[[nn.Module], bool], kind: str) -> nn.Module:
        """Build a ``_target_`` entry and check that the result is what the pool serves.

        Args:
            name: the model's name in the pool (for the error).
            entry: its ``_target_`` config.
            accepts: the predicate the built model must pass.
            kind: what the pool serves, in words (``"a CLIP vision model"``).
        """
        model = BaseModelPool._load_model(self, name, entry)
        if not accepts(model):
            raise ModelLoadError(f"model {name!r}: _target_ returned a {type(model).__name__}, not {kind}")
        return model

    def load_pretrained_model(self) -> nn.Module:
        if not self.has_pretrained:
            raise ModelPoolError(f"the pool has no {PRETRAINED!r} model; models: {', '.join(self._models)}")
        return self.load_model(PRETRAINED)

    def load_pretrained_or_first_model(self) -> nn.Module:
        """``_pretrained_`` if present, else the first model."""
        return self.load_model(PRETRAINED if self.has_pretrained else self.all_model_names[0])

    def named_models(self) -> Iterator[tuple[str, nn.Module]]:
        """Yield ``(name, model)`` for the fine-tuned models, loading one at a time."""
        for name in self.model_names:
            yield name, self.load_model(name)

    def checkpoint_sources(self) -> dict[str, dict[str, Any]]:
        """Where the checkpoints the pool has opened so far come from (for reports).

        Returns:
            ``{name: {"location": str, "revision": str | None, "files": [Path, ...]}}``; models
            given as modules or ``_target_`` configs have no files and are left out.
        """
        return {}

    # ---- per-tensor access ----------------------------------------------------------------
    def tensor_source(self, name: str) -> TensorSource:
        """Lazy ``{key: tensor}`` of model ``name``. The base class loads the whole model
        (keeping only the last one); pools over safetensors files override this to read
        single tensors."""
        if self._source_cache is None or self._source_cache[0] != name:
            model = self.load_model(name)
            self._source_cache = (name, StateDictSource(model.state_dict(), what=f"model {name!r}"))
        return self._source_cache[1]

    def canonical_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s tensors under the keys of :meth:`keys` (sharing storage with the model)."""
        return model.state_dict()

    def keys(self, name: str) -> list[str]:
        """The tensor names of model ``name`` (canonical layout)."""
        return self.tensor_source(name).keys()

    def get_tensor(self, name: str, key: str) -> torch.Tensor:
        """One tensor of model ``name``, read without loading the whole model where possible."""
        return self.tensor_source(name).get(key)

    # ---- saving ---------------------------------------------------------------------------
    def save_model(self, model: nn.Module, path: str | Path, *, description: str = "") -> Path:
        """Save ``model`` to the folder ``path`` atomically (``save_pretrained`` when the model
        has it, else ``model.safetensors``), with a short model card ``README.md``."""
        with atomic_directory(path) as tmp:
            if hasattr(model, "save_pretrained"):
                model.save_pretrained(tmp)
            else:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
            self._save_extras(tmp)
            (tmp / "README.md").write_text(description or f"Merged with FusionBench from {self.all_model_names}.\n")
        return Path(path)

    def _save_extras(self, directory: Path) -> None:
        """Hook: save what a model folder needs besides the weights (e.g. the processor)."""

    # ---- datasets -----------------------------------------------------------------------
    @property
    def train_dataset_names(self) -> list[str]:
        return list(self._datasets["train"])

    @property
    def val_dataset_names(self) -> list[str]:
        return list(self._datasets["val"])

    @property
    def test_dataset_names(self) -> list[str]:
        return list(self._datasets["test"])

    def _load_dataset(self, which: str, name: str, split: str) -> Any:
        entries = self._datasets[which]
        if name not in entries:
            known = ", ".join(entries) or "none"
            raise UnknownNameError(f"no {which} dataset for {name!r} in the pool; {which} datasets: {known}")
        return load_dataset_from_config(entries[name], split=split, what=f"{which} dataset {name!r}")

    def load_train_dataset(self, name: str) -> Any:
        return self._load_dataset("train", name, "train")

    def load_val_dataset(self, name: str) -> Any:
        return self._load_dataset("val", name, "validation")

    def load_test_dataset(self, name: str) -> Any:
        return self._load_dataset("test", name, "test")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(models={self.all_model_names})"
