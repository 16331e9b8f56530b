"""LoRA / L-LoRA CLIP vision models: create, load (peft), linearise, fold, save.

See :mod:`fusion_bench.models.linearized.lora` for the adapter format and the exact weight-space
semantics of both kinds.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fusion_bench.errors import ModelLoadError
from fusion_bench.models.hf_clip import vision_state_dict
from fusion_bench.models.linearized.linearized_model import LinearizedModule
from fusion_bench.models.linearized.lora import (
    META_FILE,
    POINT_FILE,
    Factors,
    LoRAAdapter,
    base_fingerprint,
    canonical_module,
    check_adapter_fits,
    lora_factors,
    read_adapter,
)
from fusion_bench.utils.io import atomic_directory

__all__ = [
    "new_lora_vision_model",
    "linearize_lora_model_",
    "fold_adapter_",
    "load_lora_vision_model_hf",
    "load_l_lora_vision_model_hf",
    "save_lora_adapter",
    "adapter_from_model",
    "merge_lora_model",
]

ADAPTER = "default"


def _load_base(base: Any, *, what: str) -> nn.Module:
    """A ``CLIPVisionModel``: ``base`` itself (used in place) or loaded from a path / hub id."""
    if isinstance(base, nn.Module):
        return base
    from transformers import CLIPVisionModel

    try:
        return CLIPVisionModel.from_pretrained(str(base)).eval()
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"{what}: cannot load the base CLIP vision model {str(base)!r} ({err.__class__.__name__})"
        ) from None


def _submodule(model: nn.Module, module: str) -> nn.Module:
    """The layer at canonical path ``module`` (transformers 5 bare, or 4 under ``vision_model.``)."""
    for path in (module, f"vision_model.{module}"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ModelLoadError(f"the model has no module {module!r}")


def _wrap(base: nn.Module, config: Any, seed: int = 0) -> nn.Module:
    """``get_peft_model`` seeded, without touching the global RNG (peft initialises A randomly)."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(base, config)


def new_lora_vision_model(
    base: nn.Module,
    *,
    r: int,
    lora_alpha: float,
    target_modules: Sequence[str],
    lora_dropout: float,
    linearized: bool = False,
    seed: int = 0,
    base_model_name_or_path: str | None = None,
) -> nn.Module:
    """A trainable LoRA (or, ``linearized``, L-LoRA) model on ``base`` (peft's initialisation: A
    Kaiming-uniform from ``seed``, B = 0); only the adapter's factors require grad."""
    from peft import LoraConfig

    config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules), lora_dropout=lora_dropout)
    model = _wrap(base, config, seed)
    model.peft_config[ADAPTER].base_model_name_or_path = base_model_name_or_path  # peft resets it to the module's
    return linearize_lora_model_(model) if linearized else model


def _peft_model(base: nn.Module, adapter: LoRAAdapter, *, what: str) -> nn.Module:
    from peft import LoraConfig

    shapes = {k: tuple(v.shape) for k, v in vision_state_dict(base).items()}
    weights = {k: v for k, v in vision_state_dict(base).items() if k in adapter.weight_keys}
    check_adapter_fits(adapter, shapes, weights, base=str(getattr(base, "name_or_path", "") or "the base"), what=what)
    fields = set(LoraConfig.__dataclass_fields__)
    skip = ("inference_mode", "base_model_name_or_path")  # peft would reset the latter (with a warning)
    config = LoraConfig(**{k: v for k, v in adapter.config.items() if k in fields and k not in skip})
    model = _wrap(base, config)
    model.peft_config[ADAPTER].base_model_name_or_path = adapter.base_model_name_or_path
    with torch.no_grad():
        for module, (a, b) in adapter.factors.items():
            layer = _submodule(model.base_model.model, module)
            layer.lora_A[ADAPTER].weight.copy_(a)
            layer.lora_B[ADAPTER].weight.copy_(b)
    return model


def linearize_lora_model_(model: nn.Module, point: Factors | None = None) -> nn.Module:
    """Replace every LoRA layer of a peft model by its linearisation around ``point``
    (``{module: (A0, B0)}``; None: the layers' current factors), in place."""
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)]
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        init = None
        if point is not None:
            a0, b0 = point[canonical_module(name)]
            init = {f"lora_A.{ADAPTER}.weight": a0, f"lora_B.{ADAPTER}.weight": b0}
        setattr(model.get_submodule(parent_name), child, LinearizedModule(layer, init))
    return model


def fold_adapter_(model: nn.Module, adapter: LoRAAdapter) -> nn.Module:
    """Add the adapter's weight-space change to a plain CLIP vision ``model``'s weights, in place."""
    with torch.no_grad():
        for module in adapter.factors:
            weight = _submodule(model, module).weight
            weight.copy_((weight.float() + adapter.delta(module)).to(weight.dtype))
    return model


def load_lora_vision_model_hf(base_model_name: Any, peft_name: str | Path, merge_and_unload: bool = False) -> nn.Module:
    """A LoRA CLIP vision model: base + adapter.

    Args:
        base_model_name: the base ``CLIPVisionModel`` (hub id, local folder, or a module, used in place).
        peft_name: the adapter (local folder or hub id).
        merge_and_unload: return a plain ``CLIPVisionModel`` with ``s · B A`` folded in (peft's
            ``merge_and_unload``) instead of the trainable ``PeftModel``.

    Raises:
        IncompatibleModelsError: the adapter was made for another base model.
    """
    what = f"LoRA adapter {str(peft_name)!r}"
    adapter = read_adapter(peft_name, what=what, kind="lora")
    model = _peft_model(_load_base(base_model_name, what=what), adapter, what=what)
    return model.merge_and_unload().requires_grad_(True).eval() if merge_and_unload else model


def load_l_lora_vision_model_hf(
    base_model_name: Any, peft_name: str | Path, merge_and_unload: bool = False
) -> nn.Module:
    """An L-LoRA CLIP vision model: base + adapter, every LoRA layer linearised around (A0, B0).

    Args:
        base_model_name: the base ``CLIPVisionModel`` (hub id, local folder, or a module, used in place).
        peft_name: the adapter folder (or hub id) with ``linearization_point.safetensors``
            (absent: ``A0 = A``, ``B0 = 0``).
        merge_and_unload: return a plain ``CLIPVisionModel`` with the exact linear-model weights
            ``W0 + s (B0 A + B A0 − B0 A0)`` instead.
    """
    what = f"L-LoRA adapter {str(peft_name)!r}"
    adapter = read_adapter(peft_name, what=what, kind="l_lora")
    base = _load_base(base_model_name, what=what)
    if merge_and_unload:
        shapes = {k: tuple(v.shape) for k, v in vision_state_dict(base).items()}
        weights = {k: v for k, v in vision_state_dict(base).items() if k in adapter.weight_keys}
        check_adapter_fits(
            adapter, shapes, weights, base=str(getattr(base, "name_or_path", "") or "the base"), what=what
        )
        return fold_adapter_(base, adapter).eval()
    point = adapter.point or {m: (a, torch.zeros_like(b)) for m, (a, b) in adapter.factors.items()}
    return linearize_lora_model_(_peft_model(base, adapter, what=what), point)


def _peft_config(model: nn.Module) -> Any:
    configs = getattr(model, "peft_config", None)
    if not configs or ADAPTER not in configs:
        raise ModelLoadError(f"save_lora_adapter: {type(model).__name__} is not a peft model with adapter {ADAPTER!r}")
    return copy.deepcopy(configs[ADAPTER])


def save_lora_adapter(
    model: nn.Module,
    path: str | Path,
    *,
    kind: str,
    base_model_name_or_path: str | None,
    base_weights: Mapping[str, torch.Tensor] | None = None,
    description: str = "",
) -> Path:
    """Save a (linearised) peft model's adapter as a folder peft and the pools read, atomically.

    Args:
        model: the peft model (its LoRA layers possibly wrapped in :class:`LinearizedModule`).
        path: the folder.
        kind: ``"lora"`` or ``"l_lora"`` (L-LoRA also saves the linearization point).
        base_model_name_or_path: recorded as the adapter's base.
        base_weights: the base's targeted weights (canonical keys), for the base fingerprint.
        description: the model card (``README.md``).
    """
    from safetensors.torch import save_file

    config = _peft_config(model)
    config.base_model_name_or_path, config.inference_mode = base_model_name_or_path, True
    factors = lora_factors(model)
    tensors = {
        f"base_model.model.{m}.lora_{n}.weight": t.cpu().contiguous()
        for m, ab in factors.items()
        for n, t in zip("AB", ab)
    }
    meta = {
        "kind": kind,
        "base_model_name_or_path": base_model_name_or_path,
        "base_fingerprint": base_fingerprint(base_weights) if base_weights is not None else None,
    }
    with atomic_directory(path) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if kind == "l_lora":
            save_file(_linearization_point(model), str(tmp / POINT_FILE), metadata={"format": "pt"})
        (tmp / "README.md").write_text(description or f"{kind} adapter saved by FusionBench.\n")
    return Path(path)


def _linearization_point(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearizedModule):
            point = module.point_values()
            for factor in "AB":
                key = f"base_model.model.{canonical_module(name)}.lora_{factor}.weight"
                out[key] = point[f"lora_{factor}.{ADAPTER}.weight"].cpu().contiguous()
    return out


def adapter_from_model(model: nn.Module, *, location: str = "<in memory>") -> LoRAAdapter:
    """The adapter of a live (possibly linearised) peft model, as if saved and read back."""
    config = _peft_config(model).to_dict()
    linearized = any(isinstance(m, LinearizedModule) for m in model.modules())
    point = None
    if linearized:
        raw = _linearization_point(model)
        point = {
            canonical_module(k.rsplit(".lora_", 1)[0]): (raw[k], raw[k.replace("lora_A", "lora_B")])
            for k in raw
            if ".lora_A." in k
        }
    factors = {m: (a.clone(), b.clone()) for m, (a, b) in lora_factors(model).items()}
    return LoRAAdapter(
        location,
        config,
        "l_lora" if linearized else "lora",
        factors,
        point,
        config.get("base_model_name_or_path"),
        None,
        [],
    )


def _unwrap_linearized_(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, LinearizedModule):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.module)


def merge_lora_model(model: nn.Module) -> nn.Module:
    """Fold a trained (L-)LoRA peft model into a plain ``CLIPVisionModel`` (the exact weight-space
    semantics of :mod:`~fusion_bench.models.linearized.lora`); ``model`` is consumed."""
    adapter = adapter_from_model(model)
    _unwrap_linearized_(model)
    return fold_adapter_(model.unload(), adapter).requires_grad_(True).eval()
