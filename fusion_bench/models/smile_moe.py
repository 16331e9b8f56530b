"""SMILE: linear layers upscaled into sparse mixtures of low-rank experts, without training.

Tang et al., *SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained Foundation
Models*, 2024. https://arxiv.org/abs/2408.10174

A linear layer ``y = W0 x + b0`` with fine-tuned versions ``(Wi, bi)``, i = 1..T, becomes a
:class:`SmileMoELinear`: with ``ΔWi = Wi − W0 = Ui Si Viᵀ`` (SVD, singular values descending),

* expert i is the rank-k part of ΔWi plus its bias difference: ``Ei(x) = Ui[:, :k] (Si[:k] Vi[:, :k]ᵀ x) +
  (bi − b0)`` (:class:`SmileCompressedLinear`; ``k ≤ 0`` keeps the whole ``ΔWi``);
* the router scores expert i by ``ri(x) = ‖Vi[:, :gate_k]ᵀ x‖₂``, the norm of the input's projection on the
  expert's top right singular vectors (:class:`SmileGate`; with ``routing_use_diff=False`` the SVD of Wi
  itself gives the vectors);
* per token, ``p = softmax(r(x))``, the ``top_k`` largest are kept and renormalised to sum 1, and
  ``y = W0 x + b0 + Σ_{i in top-k} pi Ei(x)``.

``k`` and ``gate_k`` larger than the rank min(out, in) use every singular direction (the expert is then
ΔWi exactly).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_bench.models.hf_clip import CLIPVisionModelWrapper

__all__ = [
    "svd",
    "SmileGate",
    "SmileCompressedLinear",
    "SmileMoELinear",
    "SmileCLIPVisionModel",
    "upscale_linear",
    "load_smile_model",
]

CHECKPOINT_FILE = "smile_moe.safetensors"
CONFIG_FILE = "smile_moe.json"


def svd(weight: Tensor, *, full_matrices: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, V)`` with ``weight = U diag(S) Vᵀ`` (singular values descending; ``V``, not ``Vᵀ``)."""
    u, s, vh = torch.linalg.svd(weight, full_matrices=full_matrices)
    return u, s, vh.T


class SmileGate(nn.Module):
    """The router: ``ri(x) = ‖Viᵀ x‖₂`` over each expert's top ``k`` right singular vectors.

    Args:
        right_vectors: per expert, its right singular vectors ``V`` (``(in, r)``, columns by decreasing
            singular value).
        k: how many of each expert's vectors route (at most ``r``).
    """

    def __init__(self, right_vectors: Sequence[Tensor], k: int) -> None:
        super().__init__()
        self.num_experts = len(right_vectors)
        self.k = min(k, *(v.shape[1] for v in right_vectors))
        stacked = torch.stack([v[:, : self.k].T for v in right_vectors])  # (T, k, in)
        self.weight = nn.Parameter(stacked.reshape(self.num_experts * self.k, -1).contiguous(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(N, in)`` -> ``(N, T)`` routing scores (all 1 with a single expert)."""
        if self.num_experts == 1:
            return torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        return F.linear(x, self.weight).view(x.shape[0], self.num_experts, self.k).norm(p=2, dim=2)


class SmileCompressedLinear(nn.Module):
    """``x -> U (S Vᵀ x) + bias``: a rank-k linear map from a truncated SVD.

    Args:
        u, s, v: the SVD of the weight (``V`` not transposed); the first ``k`` directions are kept.
        k: the rank kept (at most ``len(s)``).
        bias: the output bias, or None.
    """

    def __init__(self, u: Tensor, s: Tensor, v: Tensor, k: int, bias: Tensor | None) -> None:
        super().__init__()
        k = min(k, s.shape[0])
        self.u = nn.Parameter(u[:, :k].contiguous(), requires_grad=False)
        self.svh = nn.Parameter((s[:k] * v[:, :k]).T.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.svh), self.u, self.bias)


class SmileMoELinear(nn.Module):
    """A linear layer plus a sparse mixture of low-rank experts (see the module docstring).

    Args:
        pretrained: the pre-trained ``nn.Linear`` (the shared part).
        gate: the router.
        experts: one module per fine-tuned model computing ``ΔWi x + (bi − b0)``.
        top_k: experts used per token.
    """

    def __init__(self, pretrained: nn.Linear, gate: SmileGate, experts: Sequence[nn.Module], top_k: int) -> None:
        super().__init__()
        self.pretrained_model = pretrained
        self.gate = gate
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)
        self.top_k = top_k
        self.in_features = pretrained.in_features
        self.out_features = pretrained.out_features

    @property
    def weight(self) -> Tensor:
        """The pre-trained weight (code reading a linear layer's device or dtype from ``.weight`` keeps working)."""
        return self.pretrained_model.weight

    def routing_weights(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights, experts)``, both ``(N, top_k)``: the renormalised top-k softmax of the router's scores."""
        probabilities = F.softmax(self.gate(hidden), dim=1)
        weights, selected = torch.topk(probabilities, self.top_k, dim=-1)
        return weights / weights.sum(dim=-1, keepdim=True), selected

    def forward(self, x: Tensor) -> Tensor:
        shared = self.pretrained_model(x)
        hidden = x.reshape(-1, self.in_features)
        weights, selected = self.routing_weights(hidden)
        routed = torch.zeros(hidden.shape[0], self.out_features, dtype=hidden.dtype, device=hidden.device)
        for index, expert in enumerate(self.experts):
            rows, slots = torch.where(selected == index)
            if rows.numel() == 0:
                continue
            routed.index_add_(0, rows, expert(hidden[rows]) * weights[rows, slots, None])
        return shared + routed.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, gate_k={self.gate.k}"
        )


def _is_all_zero(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor is zero within ``torch.allclose``'s default tolerance (the reference's test)."""
    return all(torch.allclose(t, torch.zeros_like(t)) for t in tensors)


@torch.no_grad()
def upscale_linear(
    pretrained: nn.Linear,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    *,
    gate_k: int = 1,
    k: int = 128,
    top_k: int = 1,
    routing_use_diff: bool = True,
    full_matrices: bool = True,
    device: torch.device | str = "cpu",
) -> SmileMoELinear | None:
    """Upscale one linear layer into a :class:`SmileMoELinear` (the SVDs run on ``device``).

    Args:
        pretrained: the pre-trained layer (kept as the shared part).
        weights: the fine-tuned weights ``Wi``, one per expert.
        biases: the fine-tuned biases ``bi`` (None when the layer has none).
        gate_k: right singular vectors per expert in the router.
        k: rank of each expert (``k ≤ 0``: the whole ``ΔWi``).
        top_k: experts per token.
        routing_use_diff: route with the SVD of ``ΔWi`` (else of ``Wi``).
        full_matrices: compute full ``U``, ``V`` (the kept columns are the same either way).
        device: where the SVDs run.

    Returns:
        the upscaled layer, or None when every ``ΔWi`` is zero (the layer stays as it is).
    """
    base_w = pretrained.weight.detach()
    diffs = [w.to(base_w) - base_w for w in weights]
    if _is_all_zero(diffs):
        return None
    decompositions = [tuple(m.to(base_w.device) for m in svd(d.to(device), full_matrices=full_matrices)) for d in diffs]
    if routing_use_diff:
        gate_vectors = [v[:, : s.shape[0]] for _, s, v in decompositions]
    else:
        gate_vectors = []
        for w in weights:
            _, s, v = svd(w.to(base_w).to(device), full_matrices=full_matrices)
            gate_vectors.append(v[:, : s.shape[0]].to(base_w.device))
    gate = SmileGate(gate_vectors, gate_k)
    base_b = None if pretrained.bias is None else pretrained.bias.detach()
    bias_diffs = [None if base_b is None else b.to(base_b) - base_b for b in biases]
    experts: list[nn.Module] = []
    for (u, s, v), diff, bias in zip(decompositions, diffs, bias_diffs):
        if k > 0:
            experts.append(SmileCompressedLinear(u, s, v, k, bias))
        else:
            full = nn.Linear(diff.shape[1], diff.shape[0], bias=bias is not None).to(diff)
            full.weight.copy_(diff)
            if bias is not None:
                full.bias.copy_(bias)
            experts.append(full.requires_grad_(False))
    return SmileMoELinear(pretrained, gate, experts, top_k)


class SmileCLIPVisionModel(CLIPVisionModelWrapper):
    """A CLIP vision encoder whose linear layers were upscaled by SMILE; ``forward`` is the encoder's.

    ``save_pretrained`` writes every tensor (``smile_moe.safetensors``) and what built them
    (``smile_moe.json``: the options, the pool's models, the upscaled layers, the encoder's config) instead
    of a ``CLIPVisionModel`` folder, which could not hold the experts; :func:`load_smile_model` reads it back.

    Args:
        vision_model: the ``CLIPVisionModel`` whose linear layers were replaced in place.
        meta: the options and models it was built from.
    """

    def __init__(self, vision_model: nn.Module, *, meta: Mapping[str, Any]) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.meta = dict(meta)

    def forward(self, pixel_values: Tensor | None = None, **kwargs: Any) -> Any:
        return self.vision_model(pixel_values=pixel_values, **kwargs)

    def moe_layers(self) -> dict[str, SmileMoELinear]:
        """``{module name: upscaled layer}`` in module order."""
        return {n: m for n, m in self.vision_model.named_modules() if isinstance(m, SmileMoELinear)}

    def save_pretrained(self, save_directory: str, **_: Any) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(Path(save_directory) / CHECKPOINT_FILE))
        meta = {**self.meta, "upscaled_layers": list(self.moe_layers())}
        config = getattr(self.vision_model, "config", None)
        if config is not None:
            meta["vision_config"] = config.to_dict()
        (Path(save_directory) / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _skeleton_layer(linear: nn.Linear, tensors: Mapping[str, Tensor], prefix: str, top_k: int) -> SmileMoELinear:
    """A :class:`SmileMoELinear` shaped like the saved tensors under ``prefix`` (values loaded afterwards)."""
    gate_weight = tensors[f"{prefix}gate.weight"]
    experts: list[nn.Module] = []
    while f"{prefix}experts.{len(experts)}.u" in tensors or f"{prefix}experts.{len(experts)}.weight" in tensors:
        at = f"{prefix}experts.{len(experts)}."
        bias = tensors.get(f"{at}bias")
        if f"{at}u" in tensors:
            u, svh = tensors[f"{at}u"], tensors[f"{at}svh"]
            k = u.shape[1]
            expert: nn.Module = SmileCompressedLinear(
                torch.empty_like(u), torch.ones(k, dtype=u.dtype), torch.empty_like(svh.T), k, bias
            )
        else:
            weight = tensors[f"{at}weight"]
            expert = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).requires_grad_(False)
        experts.append(expert)
    num_experts = max(len(experts), 1)
    k = gate_weight.shape[0] // num_experts
    gate = SmileGate([torch.empty(gate_weight.shape[1], k, dtype=gate_weight.dtype)] * num_experts, k)
    return SmileMoELinear(linear, gate, experts, top_k)


def load_smile_model(path: str | os.PathLike[str]) -> SmileCLIPVisionModel:
    """Read back a SMILE model that ``merged_model_save_path`` wrote (``smile_moe.json`` + ``.safetensors``).

    Use it as a model pool entry to evaluate a saved SMILE model, e.g.
    ``modelpool.models._pretrained_={_target_: fusion_bench.models.smile_moe.load_smile_model, path: DIR}``.

    Raises:
        ModelLoadError: the folder lacks either file, or its files do not describe a SMILE CLIP model.
    """
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from fusion_bench.errors import ModelLoadError

    folder = Path(path)
    what = f"SMILE model {str(folder)!r}"
    for name in (CONFIG_FILE, CHECKPOINT_FILE):
        if not (folder / name).is_file():
            raise ModelLoadError(f"{what}: no {name} (is it a folder that smile_upscaling saved?)")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        config = CLIPVisionConfig(**meta["vision_config"])
        layers, top_k = list(meta["upscaled_layers"]), int(meta["top_k"])
    except (ValueError, KeyError, TypeError) as err:
        raise ModelLoadError(f"{what}: {CONFIG_FILE} is not a SMILE description ({err!r})") from None
    tensors = load_file(str(folder / CHECKPOINT_FILE))
    encoder = CLIPVisionModel(config).requires_grad_(False)
    try:
        for name in layers:
            linear = encoder.get_submodule(name)
            encoder.set_submodule(name, _skeleton_layer(linear, tensors, f"vision_model.{name}.", top_k))
        model = SmileCLIPVisionModel(encoder, meta={k: v for k, v in meta.items() if k != "upscaled_layers"})
        model.load_state_dict(tensors, strict=True)
    except (KeyError, AttributeError, RuntimeError) as err:
        raise ModelLoadError(f"{what}: its tensors do not match {CONFIG_FILE} ({err})") from None
    return model.eval()
