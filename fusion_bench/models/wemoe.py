"""Weight-Ensembling Mixture of Experts (WEMoE): upscale a CLIP vision encoder's MLPs.

Tang et al., *Merging Multi-Task Models via Weight-Ensembling Mixture of Experts*, ICML 2024.
https://arxiv.org/abs/2402.00433

Each upscaled layer's MLP (``fc1 -> activation -> fc2``) becomes a :class:`WeightEnsemblingMLP`:
its weights are ``W(x) = W0 + Σ_i w_i(x) τ_i`` (``W0`` the *pre-trained* MLP, ``τ_i`` the task
vectors of the experts' MLPs, no softmax), where the routing weights ``w(x)`` come from a small
router (:class:`WEMoERouter`) applied to every token of the MLP's input and averaged over the
sequence. Everything else in the encoder is the frozen task-arithmetic merge.

Routing granularity: ``batch_reduce=True`` averages the routing weights over the batch too (one
merged MLP per batch; the reference's training mode). With ``batch_reduce=False`` every sample
gets its own merged MLP, so a sample's output does not depend on the rest of its batch.
:class:`WEMoECLIPVisionModel` always evaluates per sample (``eval()``); the reference leaves the
batch average on at evaluation, which makes predictions depend on batch composition.

The task vectors are stored once per layer, stacked ``(T, out, in)``, as frozen parameters (so
``model_info`` counts them and ``.to(device)`` moves them); merged weights are computed on the fly.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fusion_bench.errors import ConfigError, ModelLoadError
from fusion_bench.models.hf_clip import CLIPVisionModelWrapper, vision_encoder_layers
from fusion_bench.utils.checkpoint import save_checkpoint

__all__ = [
    "adopt_saved_routers",
    "check_same_weights",
    "frozen_weights_fingerprint",
    "copy_router_state",
    "MLP_KEYS",
    "ROUTER_DEPTHS",
    "MLPExperts",
    "WEMoERouter",
    "WeightEnsemblingMLP",
    "WEMoECLIPVisionModel",
    "magnitude_quantile",
    "prune_task_vector",
    "upscale_clip_vision_model",
]

MLP_KEYS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
ROUTER_DEPTHS = (0, 1, 2)
# per-sample merged weights are built in chunks of at most this many elements (128 MiB in float32)
MAX_MERGED_ELEMENTS = 2**25
CHECKPOINT_FILE = "wemoe.ckpt"


class MLPExperts(NamedTuple):
    """One layer's pre-trained MLP tensors and its experts' stacked task vectors (keys: :data:`MLP_KEYS`)."""

    base: Mapping[str, torch.Tensor]  # e.g. "fc1.weight": (D, d)
    task_vectors: Mapping[str, torch.Tensor]  # e.g. "fc1.weight": (T, D, d)


def frozen_weights_fingerprint(model: nn.Module) -> str:
    """A hash of every frozen tensor of ``model`` (the merged base and the experts, not the routers): names,
    shapes, dtypes and bytes."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    tensors = [(n, p) for n, p in model.named_parameters() if not p.requires_grad] + list(model.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same_weights(saved: Mapping[str, Any], content: str, *, what: str, hint: str = "") -> None:
    """Refuse routers or a training state made for other weights of models with the same names (``saved``: the
    file's meta; files written before the fingerprint existed carry none and are accepted)."""
    made_for = saved.get("content")
    if made_for is not None and made_for != content:
        raise ConfigError(f"{what} was made for other weights of the pool's models (same names, other values){hint}")


def adopt_saved_routers(
    model: nn.Module, loaded: Mapping[str, Any] | None, resume: Mapping[str, Any] | None, *, what: str, state: str
) -> bool:
    """Stamp ``model.meta["content"]`` with :func:`frozen_weights_fingerprint`, refuse a router checkpoint
    (``loaded``, named ``what``) or training state (``resume``, named ``state``) made for other weights, and load
    the checkpoint's routers. Returns whether routers were loaded (then there is nothing to train)."""
    model.meta["content"] = frozen_weights_fingerprint(model)
    if resume is not None:
        hint = "; delete it to start over, or set method.train_state_path"
        check_same_weights(resume["meta"], model.meta["content"], what=state, hint=hint)
    if loaded is None:
        return False
    check_same_weights(loaded["meta"], model.meta["content"], what=what)
    model.load_router_state_dict(loaded["routers"], what=what)
    return True


def copy_router_state(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Copy ``state`` into the router tensors ``own`` (the same keys and shapes), or raise a ModelLoadError
    naming the first missing, unexpected and mis-shaped keys."""
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ModelLoadError(
            f"{what}: router tensors do not match this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"shape differs {bad[:3]})"
        )
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(state[key])


class WEMoERouter(nn.Module):
    """Token features -> one routing weight per expert.

    Depth 2 (reference default): ``Linear(d, d) -> ReLU -> Linear(d, T)``; depth 1: ``Linear(d, T)``;
    depth 0: a learned constant (input-independent). Linear weights ~ N(0, 0.01²), the hidden
    bias 0, the output bias (or the constant) ``init_lambda``.

    Args:
        hidden_size: d, the token feature size.
        num_experts: T.
        depth: 0, 1 or 2 hidden linear layers.
        init_lambda: the initial routing weight.
        generator: seeds the initialisation.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        *,
        depth: int = 2,
        init_lambda: float = 0.3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.depth = depth
        if depth == 0:
            self.weight = nn.Parameter(torch.full((num_experts,), float(init_lambda)))
            return
        if depth == 2:
            self.fc1 = nn.Linear(hidden_size, hidden_size)
            nn.init.normal_(self.fc1.weight, std=0.01, generator=generator)
            nn.init.zeros_(self.fc1.bias)
        self.fc2 = nn.Linear(hidden_size, num_experts)
        nn.init.normal_(self.fc2.weight, std=0.01, generator=generator)
        nn.init.constant_(self.fc2.bias, float(init_lambda))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, N, d)`` token features -> ``(B, N, T)`` routing weights (depth 0: ``(T,)``)."""
        if self.depth == 0:
            return self.weight
        if self.depth == 2:
            hidden_states = F.relu(self.fc1(hidden_states))  # (B, N, d)
        return self.fc2(hidden_states)  # (B, N, T)


def _routed_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    tv_weight: torch.Tensor,
    tv_bias: torch.Tensor,
    routing: torch.Tensor,
) -> torch.Tensor:
    """``x @ (W + Σ_t r_t τW_t)ᵀ + (b + Σ_t r_t τb_t)`` with one routing row per sample (or one for all).

    Args:
        x: (B, N, i).
        weight, bias: (o, i), (o,).
        tv_weight, tv_bias: (T, o, i), (T, o).
        routing: (1, T) shared by the batch, or (B, T) one row per sample.

    Returns:
        (B, N, o).
    """
    if routing.shape[0] == 1:
        merged_w = weight + torch.tensordot(routing[0], tv_weight, dims=1)  # (o, i)
        return F.linear(x, merged_w, bias + routing[0] @ tv_bias)
    chunk = max(1, MAX_MERGED_ELEMENTS // weight.numel())
    outputs = []
    for start in range(0, x.shape[0], chunk):
        r = routing[start : start + chunk]  # (c, T)
        merged_w = weight + torch.einsum("ct,toi->coi", r, tv_weight)  # (c, o, i)
        merged_b = bias + r @ tv_bias  # (c, o)
        outputs.append(torch.baddbmm(merged_b.unsqueeze(1), x[start : start + chunk], merged_w.transpose(1, 2)))
    return torch.cat(outputs)  # (B, N, o)


class WeightEnsemblingMLP(nn.Module):
    """A CLIP MLP whose weights are ``W0 + Σ_i w_i(x) τ_i`` (see the module docstring).

    Args:
        experts: the pre-trained MLP tensors and the stacked task vectors.
        activation: the MLP's activation module (``CLIPMLP.activation_fn``).
        router: the router (possibly shared with other layers).
    """

    def __init__(self, experts: MLPExperts, activation: nn.Module, router: WEMoERouter) -> None:
        super().__init__()
        frozen = lambda t: nn.Parameter(t.detach(), requires_grad=False)  # noqa: E731  (adopted, not copied)
        self.base = nn.ParameterDict({k.replace(".", "_"): frozen(experts.base[k]) for k in MLP_KEYS})
        self.task_vectors = nn.ParameterDict({k.replace(".", "_"): frozen(experts.task_vectors[k]) for k in MLP_KEYS})
        self.num_experts = int(experts.task_vectors["fc1.weight"].shape[0])
        self.activation_fn = activation
        self.router = router
        self.batch_reduce = False

    def routing_weights(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, N, d)`` -> ``(B, T)`` per sample, or ``(1, T)`` when batch-reduced or input-independent."""
        weights = self.router(hidden_states)
        if weights.dim() == 1:  # depth 0: (T,)
            return weights.unsqueeze(0)
        weights = weights.mean(dim=1)  # (B, T): averaged over the tokens
        return weights.mean(dim=0, keepdim=True) if self.batch_reduce else weights

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, N, d)`` -> ``(B, N, d)``."""
        routing = self.routing_weights(hidden_states).to(hidden_states.dtype)
        b, tv = self.base, self.task_vectors
        h = _routed_linear(hidden_states, b["fc1_weight"], b["fc1_bias"], tv["fc1_weight"], tv["fc1_bias"], routing)
        h = self.activation_fn(h)  # (B, N, D)
        return _routed_linear(h, b["fc2_weight"], b["fc2_bias"], tv["fc2_weight"], tv["fc2_bias"], routing)


class WEMoECLIPVisionModel(CLIPVisionModelWrapper):
    """A CLIP vision encoder with weight-ensembling MoE MLPs; ``forward`` is ``CLIPVisionModel``'s.

    ``train()`` routes with the configured ``batch_reduce``; ``eval()`` always routes per sample.

    Args:
        vision_model: the (frozen, task-arithmetic) ``CLIPVisionModel`` whose MLPs were replaced.
        upscaled_layers: the indices of the replaced layers.
        meta: what the routers belong to (the pool's models, the architecture), saved with them.
        batch_reduce: training-mode routing granularity (see the module docstring).
    """

    def __init__(
        self,
        vision_model: nn.Module,
        *,
        upscaled_layers: Sequence[int],
        meta: Mapping[str, Any],
        batch_reduce: bool = True,
    ) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.upscaled_layers = list(upscaled_layers)
        self.meta = dict(meta)
        self.train_batch_reduce = batch_reduce
        self.eval()

    def moe_layers(self) -> list[WeightEnsemblingMLP]:
        """The upscaled MLPs, in layer order."""
        layers = vision_encoder_layers(self.vision_model)
        return [layers[i].mlp for i in self.upscaled_layers]

    def train(self, mode: bool = True) -> "WEMoECLIPVisionModel":
        super().train(mode)
        for mlp in self.moe_layers():
            mlp.batch_reduce = bool(mode and self.train_batch_reduce)
        return self

    def forward(self, pixel_values: torch.Tensor | None = None, **kwargs: Any) -> Any:
        return self.vision_model(pixel_values=pixel_values, **kwargs)

    def routers(self) -> dict[str, WEMoERouter]:
        """``{"layers.<i>": router}``, or ``{"shared": router}`` when one router serves every layer."""
        routers = {f"layers.{i}": mlp.router for i, mlp in zip(self.upscaled_layers, self.moe_layers())}
        unique = {id(r) for r in routers.values()}
        return {"shared": next(iter(routers.values()))} if len(unique) == 1 and len(routers) > 1 else routers

    def router_state_dict(self) -> dict[str, torch.Tensor]:
        """The routers' tensors (CPU copies) under layout-independent names (``layers.3.fc2.bias``)."""
        return {
            f"{name}.{k}": v.detach().cpu().clone()
            for name, r in self.routers().items()
            for k, v in r.state_dict().items()
        }

    def load_router_state_dict(self, state: Mapping[str, torch.Tensor], *, what: str) -> None:
        """Load what :meth:`router_state_dict` returned, strictly (a mismatch is a ModelLoadError)."""
        own = {f"{name}.{k}": v for name, r in self.routers().items() for k, v in r.state_dict().items()}
        copy_router_state(own, state, what=what)

    def save_pretrained(self, save_directory: str, **_: Any) -> None:
        """Write the routers with their meta to ``save_directory/wemoe.ckpt`` (the frozen rest is
        rebuilt from the model pool; load it with the method's ``checkpoint=`` option)."""
        from pathlib import Path

        save_checkpoint(Path(save_directory) / CHECKPOINT_FILE, {"routers": self.router_state_dict()}, meta=self.meta)


def magnitude_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-quantile of ``|values|`` with linear interpolation (``torch.quantile``'s default),
    for tensors of any size (``torch.quantile`` refuses more than 2**24 elements)."""
    flat = values.detach().abs().flatten()
    pos = q * (flat.numel() - 1)
    low = int(pos)
    high = min(low + 1, flat.numel() - 1)
    v_low = flat.kthvalue(low + 1).values
    v_high = flat.kthvalue(high + 1).values if high != low else v_low
    return v_low + (pos - low) * (v_high - v_low)


def prune_task_vector(task_vector: torch.Tensor, prune_ratio: float) -> torch.Tensor:
    """Keep the entries with ``|v| > `` the ``prune_ratio``-quantile of ``|v|`` (the efficient WEMoE;
    ratio 0.9 keeps about the largest 10%); ``prune_ratio = 0`` returns ``task_vector`` unchanged."""
    if prune_ratio == 0:
        return task_vector
    return task_vector * (task_vector.abs() > magnitude_quantile(task_vector, prune_ratio))


def upscale_clip_vision_model(
    merged: nn.Module,
    experts: Mapping[int, MLPExperts],
    *,
    router_depth: int = 2,
    init_lambda: float = 0.3,
    shared_gate: bool = False,
    batch_reduce: bool = True,
    seed: int = 0,
    meta: Mapping[str, Any] | None = None,
) -> WEMoECLIPVisionModel:
    """Replace the MLPs of ``merged`` (a ``CLIPVisionModel``, modified in place and frozen) by
    weight-ensembling MLPs.

    Args:
        merged: the frozen base (task arithmetic of the pool).
        experts: ``{layer index: MLPExperts}`` for each layer to upscale.
        router_depth: 0, 1 or 2 (see :class:`WEMoERouter`).
        init_lambda: the routers' initial output.
        shared_gate: one router for every upscaled layer (the efficient variant) instead of one each.
        batch_reduce: training-mode routing averaged over the batch.
        seed: seeds the routers' initialisation (layers in increasing order).
        meta: stored with the routers (see :class:`WEMoECLIPVisionModel`).

    Returns:
        the wrapped model; only the routers require grad.
    """
    merged.requires_grad_(False)
    layers = vision_encoder_layers(merged)
    generator = torch.Generator().manual_seed(seed)
    dtype = next(merged.parameters()).dtype
    first = experts[min(experts)]
    num_experts, hidden = first.task_vectors["fc1.weight"].shape[0], first.base["fc1.weight"].shape[1]
    make_router = lambda: WEMoERouter(
        hidden,
        num_experts,
        depth=router_depth,
        init_lambda=init_lambda,  # noqa: E731
        generator=generator,
    ).to(dtype)
    shared = make_router() if shared_gate else None
    for index in sorted(experts):
        activation = layers[index].mlp.activation_fn
        layers[index].mlp = WeightEnsemblingMLP(experts[index], activation, shared or make_router())
    return WEMoECLIPVisionModel(merged, upscaled_layers=sorted(experts), meta=meta or {}, batch_reduce=batch_reduce)
