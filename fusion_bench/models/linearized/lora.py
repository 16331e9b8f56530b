"""LoRA and L-LoRA adapters on Hugging Face CLIP vision encoders (peft), and their weight-space fold.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) adds ``s · B A x`` to a linear layer
``W0 x`` (``A``: (r, in), ``B``: (out, r), ``s = lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA).
L-LoRA (Tang et al., ICLR 2024, https://arxiv.org/abs/2310.04742) linearises every LoRA layer
around its initialisation ``(A0, B0)`` (:class:`~fusion_bench.models.linearized.LinearizedModule`).

Weight-space semantics (what the pools fold and the merges see):

* LoRA: ``W = W0 + s · B A``; peft's ``merge_and_unload`` gives the same.
* L-LoRA: the linearised layer is ``W0 x + s (B0 A0 + B0 (A − A0) + (B − B0) A0) x``, i.e. the
  linear layer ``W = W0 + s (B0 A + B A0 − B0 A0)``, exactly (the expansion of a bilinear map is
  exact up to the dropped second-order term ``(B − B0)(A − A0)``, which the linear model does not
  have). With peft's initialisation ``B0 = 0`` this is ``W0 + s B A0``; ``A`` gets zero gradient, so
  after training ``A = A0`` and the fold equals the LoRA formula on the saved factors.

So both fold into plain ``CLIPVisionModel`` weights and every per-tensor merge applies; the
task vector of an adapter is its ``s · B A`` (resp. the L-LoRA term) on the targeted weights and
zero elsewhere.

Adapter folders: peft's ``adapter_config.json`` + ``adapter_model.safetensors`` (keys
``base_model.model.<module>.lora_A.weight``, with or without ``vision_model.``), plus, when
written by FusionBench, ``fusion_bench_adapter.json`` (kind, base model, a fingerprint of the base
weights the adapter was trained on) and, for L-LoRA, ``linearization_point.safetensors`` (A0, B0;
absent: ``A0 = A``, ``B0 = 0``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from fusion_bench.errors import IncompatibleModelsError, ModelLoadError

__all__ = [
    "ADAPTER_CONFIG",
    "META_FILE",
    "POINT_FILE",
    "KINDS",
    "LoRAAdapter",
    "is_adapter_folder",
    "read_adapter",
    "base_fingerprint",
    "check_adapter_fits",
    "canonical_module",
    "lora_factors",
]

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
META_FILE = "fusion_bench_adapter.json"
POINT_FILE = "linearization_point.safetensors"
KINDS = ("lora", "l_lora")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:vision_model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$"
)
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r))


def _canonical_factors(state: Mapping[str, torch.Tensor], *, what: str) -> tuple[Factors, list[str]]:
    """``({module: (A, B)}, keys that are not LoRA factors)``."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            other.append(key)
            continue
        parts.setdefault(match["module"], {})[match["factor"]] = tensor
    broken = sorted(m for m, p in parts.items() if set(p) != {"A", "B"})
    if broken:
        raise ModelLoadError(f"{what}: LoRA module(s) {broken[:3]} lack lora_A or lora_B")
    return {m: (p["A"], p["B"]) for m, p in sorted(parts.items())}, sorted(other)


@dataclass
class LoRAAdapter:
    """A LoRA / L-LoRA adapter read from a folder or the hub.

    Attributes:
        location: where it was read from.
        config: ``adapter_config.json``.
        kind: ``"lora"`` or ``"l_lora"``.
        factors: ``{module: (A, B)}``, module paths in canonical CLIP vision naming
            (``encoder.layers.0.self_attn.q_proj``).
        point: L-LoRA's ``{module: (A0, B0)}`` (None: ``A0 = A``, ``B0 = 0``).
        base_model_name_or_path: the base recorded in the adapter.
        base_fingerprint: content hash of the base weights it was trained on (FusionBench adapters).
        unsupported: why the adapter cannot be folded per tensor (empty: it can).
    """

    location: str
    config: dict
    kind: str
    factors: Factors
    point: Factors | None
    base_model_name_or_path: str | None
    base_fingerprint: str | None
    unsupported: list[str]

    @property
    def scale(self) -> float:
        """``s = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)."""
        r, alpha = int(self.config["r"]), float(self.config["lora_alpha"])
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    @property
    def weight_keys(self) -> dict[str, str]:
        """``{canonical weight key: module}`` of the weights the adapter changes."""
        return {f"{m}.weight": m for m in self.factors}

    def delta(self, module: str) -> torch.Tensor:
        """The weight-space change of ``module``, (out, in) float32 (see module docstring)."""
        a, b = (t.float() for t in self.factors[module])
        if self.kind == "lora":
            return self.scale * (b @ a)
        a0, b0 = (t.float() for t in self.point[module]) if self.point else (a, torch.zeros_like(b))
        return self.scale * (b0 @ a + b @ a0 - b0 @ a0)


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` is a local peft adapter folder."""
    return (Path(path).expanduser() / ADAPTER_CONFIG).is_file()


def _adapter_file(name_or_path: str, filename: str, *, what: str, required: bool) -> Path | None:
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        path = local / filename
        if path.is_file():
            return path
    elif not name_or_path.startswith(("/", ".", "~")):
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(name_or_path, filename))
        except Exception as err:  # missing file, unknown repo, hub unreachable
            if required:
                raise ModelLoadError(
                    f"{what}: cannot get {filename!r} of adapter {name_or_path!r} ({err.__class__.__name__})"
                ) from None
            return None
    if required:
        raise ModelLoadError(f"{what}: no {filename!r} in adapter {name_or_path!r} (is it a peft adapter folder?)")
    return None


def _read_tensors(path: Path, *, what: str) -> dict[str, torch.Tensor]:
    from fusion_bench.models.torch_files import load_state_dict_file

    return load_state_dict_file(path, what=what)


def _unsupported(config: Mapping[str, Any], other_keys: list[str]) -> list[str]:
    reasons = [
        f"{k}={config[k]!r}"
        for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "lora_bias")
        if config.get(k)
    ]
    if config.get("bias", "none") != "none":
        reasons.append(f"bias={config['bias']!r}")
    if other_keys:
        reasons.append(f"non-LoRA tensors {other_keys[:3]}")
    return reasons


def read_adapter(name_or_path: str | Path, *, what: str, kind: str | None = None) -> LoRAAdapter:
    """Read an adapter folder (or hub repo): config, factors, and FusionBench's metadata if present.

    Args:
        name_or_path: a local folder or a hub id.
        what: names the model in messages.
        kind: ``"lora"``/``"l_lora"`` (None: the recorded kind, else ``"lora"``).

    Raises:
        ModelLoadError: missing files, not a LoRA adapter, or an unknown kind.
    """
    name_or_path = str(name_or_path)
    config = json.loads(_adapter_file(name_or_path, ADAPTER_CONFIG, what=what, required=True).read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ModelLoadError(f"{what}: adapter {name_or_path!r} is a {config.get('peft_type')!r} adapter, not LoRA")
    weights = next(
        (p for f in ADAPTER_WEIGHTS if (p := _adapter_file(name_or_path, f, what=what, required=False))), None
    )
    if weights is None:
        raise ModelLoadError(f"{what}: adapter {name_or_path!r} has no {' or '.join(ADAPTER_WEIGHTS)}")
    factors, other = _canonical_factors(_read_tensors(weights, what=what), what=what)
    meta_file = _adapter_file(name_or_path, META_FILE, what=what, required=False)
    meta = json.loads(meta_file.read_text()) if meta_file else {}
    kind = kind or meta.get("kind", "lora")
    if kind not in KINDS:
        raise ModelLoadError(f"{what}: unknown adapter kind {kind!r}; choose one of {', '.join(KINDS)}")
    point_file = _adapter_file(name_or_path, POINT_FILE, what=what, required=False) if kind == "l_lora" else None
    point = _canonical_factors(_read_tensors(point_file, what=what), what=what)[0] if point_file else None
    return LoRAAdapter(
        name_or_path,
        config,
        kind,
        factors,
        point,
        meta.get("base_model_name_or_path") or config.get("base_model_name_or_path"),
        meta.get("base_fingerprint"),
        _unsupported(config, other),
    )


def base_fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """Content hash of the base weights an adapter modifies (float32 bytes, sorted keys)."""
    h = hashlib.blake2b(digest_size=16)
    for key in sorted(weights):
        h.update(key.encode())
        h.update(weights[key].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_adapter_fits(
    adapter: LoRAAdapter,
    shapes: Mapping[str, tuple[int, ...]],
    weights: Mapping[str, torch.Tensor] | None,
    *,
    base: str,
    what: str,
) -> None:
    """Raise :class:`IncompatibleModelsError` unless ``adapter`` was made for this base.

    Args:
        adapter: the adapter.
        shapes: the base's ``{canonical key: shape}``.
        weights: the base's targeted weights (for the fingerprint; None: skip that check).
        base: names the base in messages.
        what: names the model in messages.
    """
    trained_on = f" (it was trained on {adapter.base_model_name_or_path!r})" if adapter.base_model_name_or_path else ""
    for module, (a, b) in adapter.factors.items():
        key = f"{module}.weight"
        if key not in shapes:
            raise IncompatibleModelsError(
                f"{what}: adapter {adapter.location!r} targets {module!r}, which base {base!r} does not have{trained_on}"
            )
        if len(shapes[key]) != 2 or (b.shape[0], a.shape[1]) != tuple(shapes[key]):
            raise IncompatibleModelsError(
                f"{what}: adapter {adapter.location!r} changes {key!r} by a ({b.shape[0]}, {a.shape[1]}) update but "
                f"base {base!r} has shape {tuple(shapes[key])}: it is an adapter for another base model{trained_on}"
            )
    if weights is not None and adapter.base_fingerprint and base_fingerprint(weights) != adapter.base_fingerprint:
        raise IncompatibleModelsError(
            f"{what}: adapter {adapter.location!r} was trained on other base weights than base {base!r}{trained_on} "
            f"(fingerprint {adapter.base_fingerprint} recorded, {base_fingerprint(weights)} found)"
        )
    if adapter.base_model_name_or_path and str(adapter.base_model_name_or_path) != base:
        log.info("%s: adapter recorded base %r, using %r", what, adapter.base_model_name_or_path, base)


def canonical_module(name: str) -> str:
    """A live peft model's module name in canonical CLIP vision naming (no ``base_model.model.``,
    no ``vision_model.``, no :class:`LinearizedModule` ``.module``)."""
    name = name.removeprefix("base_model.model.").removeprefix("vision_model.")
    return name.removesuffix(".module")


def lora_factors(model: nn.Module, adapter_name: str = "default") -> Factors:
    """``{canonical module: (A, B)}`` of a live peft model (linearised layers included)."""
    out = {}
    for name, module in model.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if isinstance(lora_a, nn.ModuleDict) and adapter_name in lora_a:
            out[canonical_module(name)] = (lora_a[adapter_name].weight.detach(), lora_b[adapter_name].weight.detach())
    return out
