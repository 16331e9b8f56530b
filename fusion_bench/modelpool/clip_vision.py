"""CLIP vision encoders from the Hugging Face hub or local ``save_pretrained`` folders.

Model entries: a path string (hub id or local folder), ``{pretrained_model_name_or_path,
revision?, torch_dtype?}``, or a ``_target_`` config. Weights are read from safetensors
with only the files needed (``config.json`` and ``model.safetensors``, never a whole repo
snapshot), keys normalised to the canonical CLIP vision layout (see
:mod:`fusion_bench.models.hf_clip`), so transformers-4 and -5 checkpoints mix freely.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from fusion_bench.errors import ModelLoadError, ModelPoolError
from fusion_bench.modelpool.base_pool import PRETRAINED, BaseModelPool, register_modelpool
from fusion_bench.modelpool.lazy_tensors import SafetensorsSource, StateDictSource, TensorSource, safetensors_files_in
from fusion_bench.models.hf_clip import (
    build_clip_vision_model,
    canonical_vision_keys,
    is_clip_vision_model,
    load_clip_processor,
    vision_config_from_dict,
    vision_state_dict,
)
from fusion_bench.utils.instantiate import to_container
from fusion_bench.utils.io import read_json_file

__all__ = ["CLIPVisionModelPool", "HuggingFaceClipVisionPool", "looks_like_local_path"]

log = logging.getLogger(__name__)

_MODEL_KEYS = {"pretrained_model_name_or_path", "revision", "torch_dtype"}


def looks_like_local_path(path: str) -> bool:
    """Whether ``path`` is meant as a local path (exists, or is written like one)."""
    return Path(path).expanduser().exists() or path.startswith(("/", "./", "../", "~", "."))


@dataclass(frozen=True)
class _Checkpoint:
    """Where a model's files are: its ``config.json`` content and safetensors files (None: none)."""

    config: dict
    files: list[Path] | None
    location: str


def _hub_file(repo_id: str, filename: str, revision: str | None, *, what: str) -> Path | None:
    """Download (or find in the cache) one file of a hub repo; None if the repo lacks it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except EntryNotFoundError as err:
        if not isinstance(err, LocalEntryNotFoundError):  # the repo exists and lacks the file
            return None
        raise ModelLoadError(
            f"{what}: cannot get {filename!r} of {repo_id!r}: not in the local cache and the hub is "
            f"unreachable or disabled (HF_HUB_OFFLINE); pass a local folder instead"
        ) from None
    except Exception as err:  # unknown repo, network
        raise ModelLoadError(
            f"{what}: cannot get {filename!r} of {repo_id!r} from the Hugging Face hub or its cache "
            f"({err.__class__.__name__}); check the id, or pass a local folder"
        ) from None


class CLIPVisionModelPool(BaseModelPool):
    """A pool of ``CLIPVisionModel`` s (``_pretrained_`` + fine-tuned ones).

    Args:
        models: ``{name: entry}`` (see module docstring).
        processor: the ``CLIPProcessor`` to use (path, ``{pretrained_model_name_or_path}``
            or ``_target_`` config); defaults to the ``_pretrained_`` model's path.
        train_datasets / val_datasets / test_datasets: ``{task: dataset entry}``.
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        *,
        processor: Any = None,
        train_datasets: Mapping[str, Any] | None = None,
        val_datasets: Mapping[str, Any] | None = None,
        test_datasets: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(models, train_datasets=train_datasets, val_datasets=val_datasets, test_datasets=test_datasets)
        self._models = {name: self._normalise_entry(name, entry) for name, entry in self._models.items()}
        self._processor_cfg = to_container(processor)
        self._checkpoints: dict[str, _Checkpoint] = {}
        self._sources: dict[str, TensorSource] = {}

    # ---- config validation ------------------------------------------------------------
    @staticmethod
    def _normalise_entry(name: str, entry: Any) -> Any:
        if isinstance(entry, nn.Module) or (isinstance(entry, Mapping) and "_target_" in entry):
            return entry
        if isinstance(entry, (str, Path)):
            entry = {"pretrained_model_name_or_path": str(entry)}
        if not isinstance(entry, Mapping):
            raise ModelPoolError(f"model {name!r}: expected a path or a mapping, got {entry!r}")
        entry = dict(entry)
        if "path" in entry and "pretrained_model_name_or_path" not in entry:  # older configs
            entry["pretrained_model_name_or_path"] = entry.pop("path")
        unknown = sorted(set(entry) - _MODEL_KEYS)
        if unknown or not entry.get("pretrained_model_name_or_path"):
            raise ModelPoolError(
                f"model {name!r}: entry needs 'pretrained_model_name_or_path' and accepts only "
                f"{sorted(_MODEL_KEYS)}; got keys {sorted(entry)}"
            )
        path = str(entry["pretrained_model_name_or_path"])
        if looks_like_local_path(path) and not Path(path).expanduser().exists():
            raise ModelLoadError(f"model {name!r}: path {path!r} does not exist")
        return entry

    # ---- checkpoints ---------------------------------------------------------------------
    def _checkpoint(self, name: str) -> _Checkpoint:
        if name not in self._checkpoints:
            entry = self.get_model_config(name)
            self._checkpoints[name] = ckpt = self.find_checkpoint(name, entry)
            what = f"model {name!r} ({entry['pretrained_model_name_or_path']})"
            vision_config_from_dict(ckpt.config, what=what)  # type check early
        return self._checkpoints[name]

    @classmethod
    def find_checkpoint(cls, name: str, entry: Mapping[str, Any]) -> _Checkpoint:
        """The ``config.json`` and safetensors files of a ``{pretrained_model_name_or_path, revision?}``
        entry: a local folder (or ``.safetensors`` file), else a hub repo (only those files are fetched)."""
        path, rev = str(entry["pretrained_model_name_or_path"]), entry.get("revision")
        what = f"model {name!r} ({path})"
        if looks_like_local_path(path):
            return cls._local_checkpoint(Path(path).expanduser(), what=what)
        return cls._hub_checkpoint(path, rev, what=what)

    def checkpoint_sources(self) -> dict[str, dict[str, Any]]:
        """See :meth:`BaseModelPool.checkpoint_sources` (``files`` empty for ``.bin``-only checkpoints)."""
        return {
            name: {
                "location": ckpt.location,
                "revision": self.get_model_config(name).get("revision"),
                "files": list(ckpt.files or []),
            }
            for name, ckpt in self._checkpoints.items()
        }

    @staticmethod
    def _local_checkpoint(path: Path, *, what: str) -> _Checkpoint:
        if path.is_file() and path.suffix == ".safetensors":
            path, files = path.parent, [path]
        else:
            files = safetensors_files_in(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"{what}: no config.json in {str(path)!r}; is it a save_pretrained folder?")
        return _Checkpoint(read_json_file(config_file, what=what), files, str(path))

    @staticmethod
    def _hub_checkpoint(repo_id: str, revision: str | None, *, what: str) -> _Checkpoint:
        config_file = _hub_file(repo_id, "config.json", revision, what=what)
        if config_file is None:
            raise ModelLoadError(f"{what}: the hub repo has no config.json")
        files = None
        single = _hub_file(repo_id, "model.safetensors", revision, what=what)
        if single is not None:
            files = [single]
        else:
            index = _hub_file(repo_id, "model.safetensors.index.json", revision, what=what)
            if index is not None:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                files = [_hub_file(repo_id, s, revision, what=what) for s in shards]
        return _Checkpoint(read_json_file(config_file, what=what), files, repo_id)

    def tensor_source(self, name: str) -> TensorSource:
        entry = self.get_model_config(name)
        if isinstance(entry, nn.Module) or "_target_" in entry:
            return super().tensor_source(name)
        if name not in self._sources:
            ckpt = self._checkpoint(name)
            what = f"model {name!r} ({ckpt.location})"
            if ckpt.files is not None:
                self._sources[name] = SafetensorsSource(ckpt.files, rename=canonical_vision_keys, what=what)
            else:  # .bin-only checkpoints: let transformers read them
                self._sources[name] = StateDictSource(vision_state_dict(self._from_pretrained(entry, what)), what=what)
        return self._sources[name]

    def canonical_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return vision_state_dict(model)

    @staticmethod
    def _from_pretrained(entry: Mapping[str, Any], what: str) -> nn.Module:
        from transformers import CLIPVisionModel

        try:
            return CLIPVisionModel.from_pretrained(
                entry["pretrained_model_name_or_path"], revision=entry.get("revision")
            )
        except OSError as err:
            raise ModelLoadError(f"{what}: {err}") from None

    # ---- models ------------------------------------------------------------------------
    def _load_model(self, name: str, entry: Any) -> nn.Module:
        if "_target_" in entry:
            return self._load_checked_target(name, entry, is_clip_vision_model, "a CLIP vision model")
        ckpt = self._checkpoint(name)
        what = f"model {name!r} ({ckpt.location})"
        source = self.tensor_source(name)
        state = {k: source.get(k) for k in source.keys()}
        dtype = entry.get("torch_dtype")
        if dtype:
            state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}
        return build_clip_vision_model(vision_config_from_dict(ckpt.config, what=what), state, what=what)

    def _save_extras(self, directory: Path) -> None:
        if self._processor_cfg is None and not isinstance(self._models.get(PRETRAINED), Mapping):
            return
        try:
            processor = self.load_processor()
            processor.save_pretrained(directory)
            image_processor = getattr(processor, "image_processor", None)
            if image_processor is not None:  # transformers 5 nests it in processor_config.json; keep the
                image_processor.save_pretrained(directory)  # standalone preprocessor_config.json too
        except ModelLoadError as err:  # the weights are still usable without it
            log.warning("merged model saved without a processor: %s", err)

    def load_processor(self) -> Any:
        """The ``CLIPProcessor`` (image processor + tokenizer) of the pool."""
        cfg = self._processor_cfg
        if cfg is None:
            entry = self._models.get(PRETRAINED)
            if not isinstance(entry, Mapping) or "pretrained_model_name_or_path" not in entry:
                raise ModelPoolError("the pool has no 'processor' and no _pretrained_ path to take it from")
            cfg = entry["pretrained_model_name_or_path"]
        return load_clip_processor(cfg, what="modelpool processor")


register_modelpool("CLIPVisionModelPool")(CLIPVisionModelPool)


LIST_FORM_TYPES = ("huggingface_clip_vision", "HuggingFaceClipVisionPool")


@register_modelpool(*LIST_FORM_TYPES)
class HuggingFaceClipVisionPool(CLIPVisionModelPool):
    """The older list form of a CLIP pool::

    type: huggingface_clip_vision
    models: [{name: _pretrained_, path: openai/clip-vit-base-patch32}, {name: sun397, path: ...}]
    train_datasets / test_datasets / tta_datasets: [{name: sun397, dataset: {name: tanganke/sun397, split: test}}]
    """

    def __init__(
        self,
        models: Any,
        *,
        type: str | None = None,
        processor: Any = None,
        dataset_type: str | None = None,
        train_datasets: Any = None,
        val_datasets: Any = None,
        test_datasets: Any = None,
        tta_datasets: Any = None,
    ) -> None:
        if type is not None and type not in LIST_FORM_TYPES:  # the YAML's registry key, accepted here too
            raise ModelPoolError(
                f"HuggingFaceClipVisionPool: type {type!r} is not this pool's; use one of {', '.join(LIST_FORM_TYPES)}"
            )
        super().__init__(
            _list_to_mapping(models, "models", value=lambda e: {k: v for k, v in e.items() if k != "name"}),
            processor=processor,
            train_datasets=_datasets_to_mapping(train_datasets, "train_datasets"),
            val_datasets=_datasets_to_mapping(val_datasets, "val_datasets"),
            test_datasets=_datasets_to_mapping(test_datasets or tta_datasets, "test_datasets"),
        )


def _list_to_mapping(items: Any, field: str, *, value) -> dict[str, Any] | None:
    items = to_container(items)
    if items is None or isinstance(items, Mapping):
        return items
    out = {}
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or "name" not in item:
            raise ModelPoolError(f"{field}[{i}]: each entry needs a 'name'; got {item!r}")
        out[str(item["name"])] = value(item)
    return out


def _datasets_to_mapping(items: Any, field: str) -> dict[str, Any] | None:
    def entry(item: Mapping[str, Any]) -> dict[str, Any]:
        if "dataset" not in item:  # {name, path, split}
            return {k: v for k, v in item.items() if k != "name"}
        ds = {k: v for k, v in dict(item["dataset"]).items() if k != "type"}
        if "path" not in ds and "name" in ds:  # {name: <hub id>} in the older configs
            ds["path"] = ds.pop("name")
        return ds

    return _list_to_mapping(items, field, value=entry)
