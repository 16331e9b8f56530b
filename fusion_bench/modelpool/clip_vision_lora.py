"""CLIP vision pools whose models may be LoRA / L-LoRA adapters, folded into weights per tensor.

Entries are those of :class:`~fusion_bench.modelpool.CLIPVisionModelPool`, plus:

* ``{adapter: <peft adapter folder or hub id>, base?: <CLIP entry>, kind?: lora | l_lora}``: the
  base defaults to the adapter's ``base_model_name_or_path``; ``kind`` to what the adapter
  records (FusionBench's ``fusion_bench_adapter.json``), else ``lora``;
* a path string to a local peft adapter folder (``adapter_config.json``).

An adapter model *is* its folded weights (see :mod:`fusion_bench.models.linearized.lora` for the
exact LoRA and L-LoRA semantics): ``load_model`` returns a plain ``CLIPVisionModel`` and the
per-tensor reads add the adapter's change to the base's tensor, so every streaming merge applies
(task arithmetic then merges the adapters' deltas ``s · B A``). ``load_adapter_model`` gives the
unfolded peft / linearised model. An adapter made for another base (shapes, targeted modules,
or FusionBench's base fingerprint) is an :class:`~fusion_bench.errors.IncompatibleModelsError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from fusion_bench.errors import ModelLoadError, ModelPoolError
from fusion_bench.modelpool.base_pool import register_modelpool
from fusion_bench.modelpool.clip_vision import CLIPVisionModelPool, looks_like_local_path
from fusion_bench.modelpool.lazy_tensors import StateDictSource, TensorSource
from fusion_bench.models.hf_clip import vision_state_dict
from fusion_bench.models.linearized import (
    LoRAAdapter,
    is_adapter_folder,
    load_l_lora_vision_model_hf,
    load_lora_vision_model_hf,
    read_adapter,
)
from fusion_bench.models.linearized.lora import KINDS, check_adapter_fits

__all__ = ["CLIPVisionLoRAModelPool", "FoldedAdapterSource"]

_ADAPTER_KEYS = {"adapter", "base", "kind"}
BASE = "base"


class FoldedAdapterSource:
    """A base model's tensors with an adapter's weight-space change added to the weights it targets."""

    def __init__(self, base: TensorSource, adapter: LoRAAdapter, *, what: str) -> None:
        self.base, self.adapter, self.what = base, adapter, what
        self._targets = adapter.weight_keys

    def keys(self) -> list[str]:
        return self.base.keys()

    def get(self, key: str) -> torch.Tensor:
        tensor = self.base.get(key)
        if key not in self._targets:
            return tensor
        return (tensor.float() + self.adapter.delta(self._targets[key])).to(tensor.dtype)  # (out, in)

    def shape_dtype(self, key: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self.base.shape_dtype(key)


@register_modelpool("CLIPVisionLoRAModelPool")
class CLIPVisionLoRAModelPool(CLIPVisionModelPool):
    """A :class:`CLIPVisionModelPool` whose entries may also be LoRA / L-LoRA adapters (see module docstring).

    Args:
        models: ``{name: entry}``.
        processor: the ``CLIPProcessor`` (default: the ``_pretrained_`` model's path).
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
        self._adapter_entries: dict[str, dict[str, Any]] = {}
        self._adapters: dict[str, LoRAAdapter] = {}
        self._bases: dict[str, CLIPVisionModelPool] = {}
        super().__init__(
            models,
            processor=processor,
            train_datasets=train_datasets,
            val_datasets=val_datasets,
            test_datasets=test_datasets,
        )

    # ---- config --------------------------------------------------------------------------------
    def _normalise_entry(self, name: str, entry: Any) -> Any:  # type: ignore[override]
        if isinstance(entry, (str, Path)) and looks_like_local_path(str(entry)) and is_adapter_folder(entry):
            entry = {"adapter": str(entry)}
        if not (isinstance(entry, Mapping) and "adapter" in entry):
            return CLIPVisionModelPool._normalise_entry(name, entry)
        what = f"model {name!r}"
        entry = dict(entry)
        unknown = sorted(set(entry) - _ADAPTER_KEYS)
        if unknown:
            raise ModelPoolError(
                f"{what}: an adapter entry accepts {sorted(_ADAPTER_KEYS)}; got unknown keys {unknown}"
            )
        if entry.get("kind") is not None and entry["kind"] not in KINDS:
            raise ModelPoolError(f"{what}: unknown adapter kind {entry['kind']!r}; choose one of {', '.join(KINDS)}")
        adapter = str(entry["adapter"])
        if looks_like_local_path(adapter) and not is_adapter_folder(adapter):
            raise ModelLoadError(f"{what}: {adapter!r} is not a peft adapter folder (no adapter_config.json)")
        if entry.get("base") is not None:
            entry["base"] = CLIPVisionModelPool._normalise_entry(f"{name} (base)", entry["base"])
        self._adapter_entries[name] = entry
        return entry

    def is_adapter(self, name: str) -> bool:
        """Whether model ``name`` is an adapter entry."""
        self.get_model_config(name)
        return name in self._adapter_entries

    def adapter(self, name: str) -> LoRAAdapter:
        """The adapter of model ``name`` (read once)."""
        if name not in self._adapters:
            entry = self._adapter_entries[name]
            self._adapters[name] = read_adapter(entry["adapter"], what=f"model {name!r}", kind=entry.get("kind"))
        return self._adapters[name]

    def _base(self, name: str) -> CLIPVisionModelPool:
        """A one-model pool holding the base of adapter ``name``."""
        if name not in self._bases:
            base = self._adapter_entries[name].get("base") or self.adapter(name).base_model_name_or_path
            if not base:
                raise ModelPoolError(
                    f"model {name!r}: the adapter records no base_model_name_or_path; give 'base' in its entry"
                )
            self._bases[name] = CLIPVisionModelPool({BASE: base})
        return self._bases[name]

    def _base_label(self, name: str) -> str:
        entry = self._base(name).get_model_config(BASE)
        return (
            str(entry.get("pretrained_model_name_or_path", entry))
            if isinstance(entry, Mapping)
            else type(entry).__name__
        )

    # ---- tensors and models ------------------------------------------------------------------------
    def tensor_source(self, name: str) -> TensorSource:
        if not self.is_adapter(name):
            return super().tensor_source(name)
        if name not in self._sources:
            what, adapter = f"model {name!r}", self.adapter(name)
            base_pool = self._base(name)
            base = base_pool.tensor_source(BASE)
            shapes = {k: base.shape_dtype(k)[0] for k in base.keys()}
            weights = {k: base.get(k) for k in adapter.weight_keys if k in shapes}
            check_adapter_fits(adapter, shapes, weights, base=self._base_label(name), what=what)
            if not adapter.unsupported:
                self._sources[name] = FoldedAdapterSource(base, adapter, what=what)
            elif adapter.kind == "lora":  # let peft fold what per-tensor folding does not cover
                model = load_lora_vision_model_hf(base_pool.load_model(BASE), adapter.location, merge_and_unload=True)
                self._sources[name] = StateDictSource(vision_state_dict(model), what=what)
            else:
                raise ModelLoadError(f"{what}: L-LoRA adapters with {', '.join(adapter.unsupported)} are not supported")
        return self._sources[name]

    def _load_model(self, name: str, entry: Any) -> nn.Module:
        if not self.is_adapter(name):
            return super()._load_model(name, entry)
        source = self.tensor_source(name)  # checks the adapter against its base
        model = self._base(name).load_model(BASE)
        own = vision_state_dict(model)
        changed = self.adapter(name).weight_keys if isinstance(source, FoldedAdapterSource) else own
        with torch.no_grad():
            for key in changed:
                own[key].copy_(source.get(key))
        return model

    def load_adapter_model(self, name: str) -> nn.Module:
        """The unfolded model of adapter ``name``: a peft ``PeftModel`` (LoRA) or the linearised one (L-LoRA)."""
        self.tensor_source(name)
        load = load_l_lora_vision_model_hf if self.adapter(name).kind == "l_lora" else load_lora_vision_model_hf
        return load(self._base(name).load_model(BASE), self.adapter(name).location)
