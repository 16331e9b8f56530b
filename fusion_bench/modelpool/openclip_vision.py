"""OpenCLIP vision encoders (the task_vectors checkpoints) with their classification heads.

Model entries (``models: {name: entry}``):

* a path string: a folder saved by this pool (``open_clip_config.json`` + ``model.safetensors``),
  a state dict file (``.safetensors`` or a ``torch.save`` d dict), or, with ``allow_pickle``, a
  pickled task_vectors ``ImageEncoder`` (the original release's ``finetuned.pt``/``zeroshot.pt``);
* ``{model_name, state_dict_path}``: the architecture by open_clip name, weights from a state dict
  (never unpickled);
* ``{model_name, pickle_path}``: weights from task_vectors' file: read as a state dict if it is one
  (e.g. converted by ``python -m fusion_bench.scripts.convert_task_vectors``), else unpickled, which
  needs ``allow_pickle: true`` (unpickling runs code from the file);
* ``{model_config: {embed_dim, vision_cfg, quick_gelu?}, ...}`` instead of ``model_name`` for
  custom architectures; ``model_name``/``model_config`` at pool level apply to every entry;
* a Hydra ``_target_`` config returning an :class:`~fusion_bench.models.openclip_vision.ImageEncoder`.

Relative paths start at ``model_dir`` (the shipped configs: ``./.cache/task_vectors_checkpoints``,
task_vectors' layout ``ViT-B-32/<Task>/finetuned.pt``, ``ViT-B-32/head_<Task>.pt``,
``ViT-B-32/zeroshot.pt``). ``classification_heads: {task: path | {path, normalize} | _target_}``.
Tensors are read one at a time from safetensors files (streaming merges hold one tensor per
model); ``.pt`` state dicts are memory-mapped; pickles are held whole (convert them once with
``fusion_bench.scripts.convert_task_vectors`` to read them safely).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from fusion_bench.errors import ModelLoadError, ModelPoolError, UnknownNameError
from fusion_bench.modelpool.base_pool import PRETRAINED, BaseModelPool, register_modelpool
from fusion_bench.modelpool.lazy_tensors import SafetensorsSource, StateDictSource, TensorSource
from fusion_bench.models.openclip_checkpoints import (
    WEIGHTS_FILE,
    folder_architecture,
    is_encoder_folder,
    load_classification_head,
    read_encoder_checkpoint,
    save_image_encoder,
)
from fusion_bench.models.openclip_vision import (
    ClassificationHead,
    ImageEncoder,
    OpenCLIPArchitecture,
    TransformImageProcessor,
    build_image_encoder,
    canonical_openclip_keys,
)
from fusion_bench.models.torch_files import is_safetensors_file
from fusion_bench.utils.instantiate import to_container

__all__ = ["OpenCLIPVisionModelPool"]

_ENTRY_KEYS = ("model_name", "model_config", "path", "state_dict_path", "pickle_path")


@dataclass(frozen=True)
class _Entry:
    """A file-backed model: where it is, how to read it, its architecture if the config names one."""

    path: Path
    kind: str  # "folder" | "file" (a state dict, or a pickle if allowed) | "state_dict" (never unpickled)
    architecture: OpenCLIPArchitecture | None


def _architecture(model_name: Any, model_config: Any, *, what: str) -> OpenCLIPArchitecture | None:
    if model_name is not None and model_config is not None:
        raise ModelPoolError(f"{what}: give model_name or model_config, not both")
    if model_config is not None:
        if not isinstance(model_config, Mapping):
            raise ModelPoolError(
                f"{what}: model_config must be a mapping {{embed_dim, vision_cfg}}, got {model_config!r}"
            )
        return OpenCLIPArchitecture.from_config(model_config, what=what)
    return OpenCLIPArchitecture.from_name(str(model_name), what=what) if model_name is not None else None


@register_modelpool("OpenCLIPVisionModelPool")
class OpenCLIPVisionModelPool(BaseModelPool):
    """A pool of OpenCLIP image encoders and their classification heads.

    Args:
        models: ``{name: entry}`` (see module docstring).
        classification_heads: ``{task: head entry}``.
        model_name: the default open_clip architecture (e.g. ``ViT-B-32``) of entries that name none.
        model_config: a default custom architecture instead of ``model_name``.
        model_dir: the folder relative paths start from (None: the working directory).
        allow_pickle: allow unpickling checkpoints (runs code from the files; only for trusted files).
        train_datasets / val_datasets / test_datasets: ``{task: dataset entry}`` (a hub id, a local
            ``save_to_disk`` folder, ``{path, split, ...}`` or a ``_target_``).
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        *,
        classification_heads: Mapping[str, Any] | None = None,
        model_name: str | None = None,
        model_config: Mapping[str, Any] | None = None,
        model_dir: str | None = None,
        allow_pickle: bool = False,
        train_datasets: Mapping[str, Any] | None = None,
        val_datasets: Mapping[str, Any] | None = None,
        test_datasets: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(models, train_datasets=train_datasets, val_datasets=val_datasets, test_datasets=test_datasets)
        if not isinstance(allow_pickle, bool):
            raise ModelPoolError(f"modelpool: allow_pickle must be true or false, got {allow_pickle!r}")
        self.allow_pickle = allow_pickle
        self.model_dir = Path(model_dir).expanduser() if model_dir else None
        self._default_arch = _architecture(model_name, to_container(model_config), what="modelpool")
        self._entries = {name: self._parse_entry(name, entry) for name, entry in self._models.items()}
        self._heads = dict(to_container(classification_heads) or {})
        self._sources: dict[str, TensorSource] = {}
        self._inferred: dict[str, OpenCLIPArchitecture | None] = {}

    # ---- config ----------------------------------------------------------------------------
    def _resolve(self, path: Any) -> Path:
        p = Path(str(path)).expanduser()
        return self.model_dir / p if self.model_dir is not None and not p.is_absolute() else p

    def _parse_entry(self, name: str, entry: Any) -> _Entry | None:
        if isinstance(entry, nn.Module) or (isinstance(entry, Mapping) and "_target_" in entry):
            return None
        what = f"model {name!r}"
        if isinstance(entry, (str, Path)):
            entry = {"path": str(entry)}
        if not isinstance(entry, Mapping):
            raise ModelPoolError(f"{what}: expected a path or a mapping, got {entry!r}")
        unknown = sorted(set(entry) - set(_ENTRY_KEYS))
        given = [k for k in ("path", "state_dict_path", "pickle_path") if entry.get(k)]
        if unknown or len(given) != 1:
            raise ModelPoolError(
                f"{what}: an entry needs exactly one of 'path', 'state_dict_path', 'pickle_path' and accepts "
                f"{', '.join(_ENTRY_KEYS)}; got keys {sorted(entry)}"
            )
        path = self._resolve(entry[given[0]])
        kind = "state_dict" if given[0] == "state_dict_path" else "file"
        if kind == "file" and is_encoder_folder(path):
            kind = "folder"
        return _Entry(path, kind, _architecture(entry.get("model_name"), entry.get("model_config"), what=what))

    # ---- per-tensor access -------------------------------------------------------------------
    def _entry(self, name: str) -> _Entry | None:
        self.get_model_config(name)  # unknown names raise
        return self._entries[name]

    def tensor_source(self, name: str) -> TensorSource:
        entry = self._entry(name)
        if entry is None:
            return super().tensor_source(name)
        if name not in self._sources:
            what = f"model {name!r}"
            files = [entry.path / WEIGHTS_FILE] if entry.kind == "folder" else [entry.path]
            if entry.kind == "folder" or is_safetensors_file(entry.path):
                if not files[0].is_file():
                    raise ModelLoadError(f"{what}: file {str(files[0])!r} does not exist")
                source: TensorSource = SafetensorsSource(
                    files, rename=canonical_openclip_keys, what=f"{what} ({entry.path})"
                )
                if not source.keys():
                    raise ModelLoadError(f"{what}: {str(files[0])!r} holds no OpenCLIP vision tower tensors")
            else:
                allow = self.allow_pickle and entry.kind == "file"
                state, self._inferred[name] = read_encoder_checkpoint(entry.path, what=what, allow_pickle=allow)
                source = StateDictSource(state, what=f"{what} ({entry.path})")
            self._sources[name] = source
        return self._sources[name]

    def architecture(self, name: str) -> OpenCLIPArchitecture:
        """The architecture of model ``name``: its entry's, its folder's or pickle's, else the pool's.

        Raises:
            ModelPoolError: nothing says which architecture the checkpoint is.
        """
        entry = self._entry(name)
        if entry is None:
            return self.load_model(name).architecture
        if entry.architecture is not None:
            return entry.architecture
        if entry.kind == "folder":
            return folder_architecture(entry.path, what=f"model {name!r}")
        if entry.kind == "file" and not is_safetensors_file(entry.path):
            self.tensor_source(name)
            if self._inferred.get(name) is not None:
                return self._inferred[name]
        if self._default_arch is not None:
            return self._default_arch
        raise ModelPoolError(
            f"model {name!r}: {str(entry.path)!r} does not record its architecture; give model_name "
            f"(e.g. 'ViT-B-32') or model_config in its entry or for the whole pool"
        )

    # ---- models ------------------------------------------------------------------------------
    def _load_model(self, name: str, entry: Any) -> nn.Module:
        if self._entries[name] is None:
            return self._load_checked_target(
                name, entry, lambda m: isinstance(m, ImageEncoder), "an OpenCLIP ImageEncoder"
            )
        source = self.tensor_source(name)
        state = {k: source.get(k) for k in source.keys()}
        return build_image_encoder(self.architecture(name), state, what=f"model {name!r} ({self._entries[name].path})")

    def save_model(self, model: nn.Module, path: str | Path, *, description: str = "") -> Path:
        """Save an :class:`ImageEncoder` as a folder this pool reads back (architecture + safetensors)."""
        if isinstance(model, ImageEncoder):
            return save_image_encoder(model, path, description=description)
        return super().save_model(model, path, description=description)

    # ---- preprocessing -------------------------------------------------------------------------
    def _reference_model(self) -> str:
        return PRETRAINED if self.has_pretrained else self.all_model_names[0]

    @property
    def test_processor(self) -> Any:
        """open_clip's evaluation transform for the pool's architecture (PIL image -> (3, H, W))."""
        return self.architecture(self._reference_model()).transform(is_train=False)

    @property
    def train_processor(self) -> Any:
        """open_clip's training transform (random resized crop)."""
        return self.architecture(self._reference_model()).transform(is_train=True)

    def load_processor(self) -> TransformImageProcessor:
        """The evaluation transform behind the image-processor interface (for data loaders)."""
        return TransformImageProcessor(self.test_processor)

    # ---- heads --------------------------------------------------------------------------------
    @property
    def classification_head_names(self) -> list[str]:
        return list(self._heads)

    def load_classification_head(self, task: str) -> ClassificationHead:
        """The classification head of ``task``."""
        if task not in self._heads:
            known = ", ".join(self._heads) or "none"
            raise UnknownNameError(f"no classification head for {task!r} in the pool; heads: {known}")
        return load_classification_head(
            self._heads[task],
            what=f"classification head {task!r}",
            allow_pickle=self.allow_pickle,
            base_dir=self.model_dir,
        )
