"""``rankone_moe``: RankOne-MoE, a weight-ensembling mixture of rank-one experts for CLIP vision encoders.

Ouyang et al., *Efficient and Effective Weight-Ensembling Mixture of Experts for Multi-Task Model
Merging*, 2024. https://arxiv.org/abs/2408.09485

Steps (the authors' defaults, as in their published configuration; docs/algorithms.md):

1. base = task arithmetic of the pool, ``θ0 + λ Σt τt`` with ``λ = scaling_factor`` (null: ``init_lambda``,
   0.3), frozen; this includes the MLP biases;
2. every encoder layer's MLP weight matrix (``fc1`` and ``fc2``; or those of the last ``num_upscaled_layers``
   layers) becomes ``W0 + Σt Σ_{j<k} r_{t,j}(x) s_{t,j} u_{t,j} v_{t,j}ᵀ``: ``W0`` pre-trained,
   ``τt = U S Vᵀ`` the SVD of expert t's task vector of that matrix, truncated to its ``k = rank_k`` (32)
   largest singular values, so each ``s u vᵀ`` is one rank-one expert (``T·k`` per matrix);
3. one router per layer maps the MLP's token features to ``T·k`` routing weights (default
   ``Linear(d, T·k)``, weights N(0, 0.01²), bias ``init_lambda``; no softmax), averaged over the tokens
   (and over the batch while training, ``batch_reduce``); ``fc1`` and ``fc2`` share them (the weight of
   component j of expert t is entry ``t·k + j``). With ``select_k > 0`` only about the ``select_k``
   largest routing weights act: each weight ``r`` is multiplied by ``sigmoid(100 (r − r_(k)))``,
   ``r_(k)`` the ``select_k``-th largest (the authors' soft top-k; -1: all experts);
4. the routers are trained by test-time entropy minimisation exactly as WEMoE's: each step takes one
   shuffled, unlabelled test batch per task (16 images), sums the prediction entropies of the tasks'
   zero-shot heads and makes one Adam step (lr 1e-4); 1000 steps.

With every routing weight 1 and ``rank_k`` the matrices' rank, a layer's weights are ``W0 + Σt τt``; with
all weights λ they are task arithmetic's. Per-sample routing never builds a routed weight: a matrix's
output is ``x W0ᵀ + ((x (SV)ᵀ) ⊙ r) Uᵀ``, so evaluation routes every sample on its own at the cost of a
``T·k``-wide low-rank product (the reference keeps the batch-averaged routing of training at evaluation).

Checkpoints, resuming and the report are WEMoE's (``save_checkpoint=``, ``checkpoint=``,
``save_interval``, ``train_state_path``); a checkpoint records ``rank_k`` and ``select_k`` with the pool's
models and the architecture, and is refused for another configuration.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fusion_bench.errors import ConfigError
from fusion_bench.merge import compute_dtype
from fusion_bench.method._options import check_int
from fusion_bench.method.base_algorithm import register_algorithm
from fusion_bench.method.task_vector.task_arithmetic import frozen_task_arithmetic
from fusion_bench.method.test_time.weight_ensembling_moe import CLIPWeightEnsemblingMoEAlgorithm
from fusion_bench.modelpool import PRETRAINED, BaseModelPool
from fusion_bench.models.hf_clip import vision_encoder_layers
from fusion_bench.models.wemoe import WEMoECLIPVisionModel
from fusion_bench.utils.checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "CLIPRankOneMoEAlgorithm",
    "RankOneExperts",
    "RankOneMoECLIPVisionModel",
    "RankOneMoEMLP",
    "RankOneRouter",
    "rank_one_experts",
    "rank_one_linear",
    "soft_top_k",
]

NAME = "rankone_moe"
CHECKPOINT_FILE = "rankone_moe.ckpt"
WEIGHT_KEYS = ("fc1", "fc2")
TOP_K_SHARPNESS = 100.0  # the slope of the authors' sigmoid mask around the k-th largest routing weight
_ACCELERATOR = re.compile(r"auto|cpu|cuda(:\d+)?")


class RankOneExperts(NamedTuple):
    """One weight matrix's rank-one experts, expert-major (component j of expert t at ``t·k + j``).

    Attributes:
        left: ``(out, T·k)``, the left singular vectors ``u``.
        right: ``(T·k, in)``, the right singular vectors scaled by their singular values, ``s vᵀ``.
    """

    left: torch.Tensor
    right: torch.Tensor


def rank_one_experts(
    task_vectors: Sequence[torch.Tensor], rank: int, *, device: torch.device | str | None = None
) -> RankOneExperts:
    """Each task vector's ``rank`` leading singular triplets, stacked as rank-one experts.

    Args:
        task_vectors: T matrices ``(out, in)``.
        rank: k, at most ``min(out, in)``.
        device: where the SVDs run (None: where the tensors are); the result comes back to their device.

    Returns:
        ``left (out, T·k)`` and ``right (T·k, in)``: ``Σ_j left[:, tk+j] right[tk+j]`` is ``τt``'s best rank-k
        approximation (``τt`` itself when k is its rank).
    """
    lefts, rights = [], []
    for tau in task_vectors:
        home, work = tau.device, tau.to(device) if device is not None else tau
        u, s, vh = torch.linalg.svd(work, full_matrices=False, driver="gesvd" if work.is_cuda else None)
        lefts.append(u[:, :rank].to(home))
        rights.append((s[:rank, None] * vh[:rank]).to(home))
    return RankOneExperts(torch.cat(lefts, dim=1), torch.cat(rights, dim=0))


def soft_top_k(weights: torch.Tensor, k: int) -> torch.Tensor:
    """The authors' soft top-k over the last dimension: ``r · sigmoid(100 (r − r_(k)))``, ``r_(k)`` the k-th largest.

    The k largest weights keep at least half their value (the k-th exactly half; those more than about
    0.05 above it almost all of it); the others are damped towards 0.
    """
    kth = weights.topk(k, dim=-1).values.amin(dim=-1, keepdim=True)
    return weights * torch.sigmoid(TOP_K_SHARPNESS * (weights - kth))


def rank_one_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, experts: RankOneExperts, routing: torch.Tensor
) -> torch.Tensor:
    """``x (W + U diag(r) SVᵀ)ᵀ + b``.

    One routing row for the batch (training): the routed weight is built once. One row per sample
    (evaluation): never built, ``x Wᵀ + ((x (SV)ᵀ) ⊙ r) Uᵀ``, a ``E``-wide low-rank product per sample.

    Args:
        x: ``(B, N, in)``.
        weight, bias: ``(out, in)``, ``(out,)``.
        experts: ``left (out, E)``, ``right (E, in)``.
        routing: ``(1, E)`` shared by the batch, or ``(B, E)`` one row per sample.

    Returns:
        ``(B, N, out)``.
    """
    if routing.shape[0] == 1:
        return F.linear(x, weight + (experts.left * routing) @ experts.right, bias)
    coefficients = (x @ experts.right.T) * routing.unsqueeze(1)  # (B, N, E)
    return F.linear(x, weight, bias) + coefficients @ experts.left.T


class RankOneRouter(nn.Module):
    """Token features -> one routing weight per rank-one expert (E = T·k), as the authors' gates.

    Depth 1 (default): ``fc = Linear(d, E)``; depth 2: ``fc1 = Linear(d, 2E) -> ReLU -> fc2 = Linear(2E, E)``;
    depth 0: a learned constant ``weight (E,)``. Linear weights ~ N(0, 0.01²), the hidden bias 0, the output
    bias (or the constant) ``init_lambda``.

    Args:
        hidden_size: d.
        num_experts: E.
        depth: 0, 1 or 2.
        init_lambda: the initial routing weight.
        generator: seeds the initialisation.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        *,
        depth: int = 1,
        init_lambda: float = 0.3,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.depth = depth
        if depth == 0:
            self.weight = nn.Parameter(torch.full((num_experts,), float(init_lambda)))
        elif depth == 1:
            self.fc = self._linear(hidden_size, num_experts, float(init_lambda), generator)
        else:
            self.fc1 = self._linear(hidden_size, 2 * num_experts, 0.0, generator)
            self.fc2 = self._linear(2 * num_experts, num_experts, float(init_lambda), generator)

    @staticmethod
    def _linear(fan_in: int, fan_out: int, bias: float, generator: torch.Generator | None) -> nn.Linear:
        layer = nn.Linear(fan_in, fan_out)
        nn.init.normal_(layer.weight, std=0.01, generator=generator)
        nn.init.constant_(layer.bias, bias)
        return layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, N, d)`` -> ``(B, N, E)`` (depth 0: ``(E,)``)."""
        if self.depth == 0:
            return self.weight
        if self.depth == 1:
            return self.fc(hidden_states)
        return self.fc2(F.relu(self.fc1(hidden_states)))


class RankOneMoEMLP(nn.Module):
    """A CLIP MLP whose weight matrices are ``W0 + U diag(r(x)) SVᵀ`` (see the module docstring).

    Args:
        base: ``fc1.weight``, ``fc2.weight`` (pre-trained) and ``fc1.bias``, ``fc2.bias`` (task arithmetic).
        experts: ``{"fc1": RankOneExperts, "fc2": RankOneExperts}``.
        activation: the MLP's activation module.
        router: this layer's router.
        select_k: keep about the ``select_k`` largest routing weights (:func:`soft_top_k`); -1: all.
    """

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        experts: Mapping[str, RankOneExperts],
        activation: nn.Module,
        router: RankOneRouter,
        *,
        select_k: int = -1,
    ) -> None:
        super().__init__()
        frozen = lambda t: nn.Parameter(t.detach(), requires_grad=False)
        self.base = nn.ParameterDict({k.replace(".", "_"): frozen(v) for k, v in base.items()})
        self.left = nn.ParameterDict({k: frozen(experts[k].left) for k in WEIGHT_KEYS})
        self.right = nn.ParameterDict({k: frozen(experts[k].right) for k in WEIGHT_KEYS})
        self.activation_fn = activation
        self.router = router
        self.select_k = select_k
        self.batch_reduce = False

    def routing_weights(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, N, d)`` -> ``(B, E)`` per sample, or ``(1, E)`` when batch-reduced or input-independent."""
        weights = self.router(hidden_states)
        if weights.dim() == 1:  # depth 0
            weights = weights.unsqueeze(0)
        else:
            weights = weights.mean(dim=1)  # (B, E): averaged over the tokens
            weights = weights.mean(dim=0, keepdim=True) if self.batch_reduce else weights
        return soft_top_k(weights, self.select_k) if self.select_k > 0 else weights

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(B, N, d)`` -> ``(B, N, d)``."""
        routing = self.routing_weights(hidden_states).to(hidden_states.dtype)
        b = self.base
        fc1 = RankOneExperts(self.left["fc1"], self.right["fc1"])
        fc2 = RankOneExperts(self.left["fc2"], self.right["fc2"])
        h = self.activation_fn(rank_one_linear(hidden_states, b["fc1_weight"], b["fc1_bias"], fc1, routing))
        return rank_one_linear(h, b["fc2_weight"], b["fc2_bias"], fc2, routing)


class RankOneMoECLIPVisionModel(WEMoECLIPVisionModel):
    """A CLIP vision encoder with RankOne-MoE MLPs (``train()``: configured ``batch_reduce``; ``eval()``: per sample)."""

    def save_pretrained(self, save_directory: str, **_: Any) -> None:
        """Write the routers with their meta to ``save_directory/rankone_moe.ckpt`` (load it with ``checkpoint=``)."""
        save_checkpoint(Path(save_directory) / CHECKPOINT_FILE, {"routers": self.router_state_dict()}, meta=self.meta)


@register_algorithm(NAME)
class CLIPRankOneMoEAlgorithm(CLIPWeightEnsemblingMoEAlgorithm):
    """RankOne-MoE for a CLIP vision model pool (see the module docstring).

    Args:
        checkpoint: a routers checkpoint (file, or a folder holding ``rankone_moe.ckpt``) to evaluate; skips training.
        save_checkpoint: where to write the trained routers (atomically).
        router_hidden_layers: router depth: 1 (the authors'), 2 or 0 (a learned constant per layer).
        init_lambda: the routers' initial output (the initial weight of every rank-one expert).
        scaling_factor: λ of the frozen task-arithmetic base (None: ``init_lambda``, as the authors).
        rank_k: rank-one experts per task and weight matrix (the leading singular triplets kept).
        select_k: experts acting per input (soft top-k over the ``T·rank_k`` routing weights); -1: all.
        svd_accelerator: where the SVDs run: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"``, or None (where the tensors are: the CPU).
        num_upscaled_layers: upscale the MLPs of the last k encoder layers (None: every layer, the authors').
        batch_reduce: while training, average routing weights over the batch (the authors'); evaluation is per sample.
        lr, optimizer, max_steps, batch_size, use_grad_accumulate, seed, num_workers, devices, save_interval,
        train_state_path, clip_model: as :class:`CLIPWeightEnsemblingMoEAlgorithm`'s.
    """

    def __init__(
        self,
        *,
        checkpoint: str | None = None,
        save_checkpoint: str | None = None,
        router_hidden_layers: int = 1,
        init_lambda: float = 0.3,
        scaling_factor: float | None = None,
        rank_k: int = 32,
        select_k: int = -1,
        svd_accelerator: str | None = "auto",
        num_upscaled_layers: int | None = None,
        batch_reduce: bool = True,
        lr: float = 1e-4,
        optimizer: str = "adam",
        max_steps: int = 1000,
        batch_size: int = 16,
        use_grad_accumulate: bool = True,
        seed: int = 42,
        num_workers: int = 0,
        devices: int = 1,
        save_interval: int = 100,
        train_state_path: str | None = None,
        clip_model: Any = None,
    ) -> None:
        super().__init__(
            checkpoint=checkpoint,
            save_checkpoint=save_checkpoint,
            router_hidden_layers=router_hidden_layers,
            init_lambda=init_lambda,
            scaling_factor=scaling_factor,
            num_upscaled_layers=num_upscaled_layers,
            batch_reduce=batch_reduce,
            lr=lr,
            optimizer=optimizer,
            max_steps=max_steps,
            batch_size=batch_size,
            use_grad_accumulate=use_grad_accumulate,
            seed=seed,
            num_workers=num_workers,
            devices=devices,
            save_interval=save_interval,
            train_state_path=train_state_path,
            clip_model=clip_model,
        )
        self.rank_k = check_int(self.name, "rank_k", rank_k, low=1)
        if isinstance(select_k, bool) or not isinstance(select_k, int) or (select_k < 1 and select_k != -1):
            raise ConfigError(
                f"{self.name}: option 'select_k' must be -1 (all experts) or an integer >= 1; got {select_k!r}"
            )
        self.select_k = select_k
        self.svd_accelerator = self._check_accelerator(svd_accelerator)
        del self.tv_prune_ratio, self.shared_gate  # WEMoE options this method does not have

    def _check_accelerator(self, value: Any) -> str | None:
        """``svd_accelerator``: None, ``"cpu"``, or a CUDA device that exists (``"auto"`` resolved here)."""
        if value is None or value is False:
            return None
        if not isinstance(value, str) or not _ACCELERATOR.fullmatch(value):
            raise ConfigError(
                f"{self.name}: option 'svd_accelerator' must be 'auto', 'cpu', 'cuda', 'cuda:N' or null; got {value!r}"
            )
        if value == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if value.startswith("cuda"):
            index = int(value.partition(":")[2] or 0)
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                raise ConfigError(
                    f"{self.name}: option 'svd_accelerator' is {value!r} but this machine has "
                    f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s); use 'auto' or 'cpu'"
                )
        return value

    # ---- layout and meta ---------------------------------------------------------------------------
    def _layout(self, modelpool: BaseModelPool) -> dict[str, Any]:
        """WEMoE's layout, after checking ``rank_k`` against the MLP matrices and ``select_k`` against ``T·rank_k``."""
        layout = super()._layout(modelpool)
        rank = min(layout["hidden_size"], layout["intermediate_size"])
        if self.rank_k > rank:
            raise ConfigError(
                f"{self.name}: option 'rank_k' is {self.rank_k} but the MLP matrices ({layout['intermediate_size']} x "
                f"{layout['hidden_size']}) have rank at most {rank}"
            )
        experts = len(modelpool.model_names) * self.rank_k
        if self.select_k > experts:
            raise ConfigError(
                f"{self.name}: option 'select_k' is {self.select_k} but there are {experts} rank-one experts per "
                f"layer ({len(modelpool.model_names)} models x rank_k {self.rank_k})"
            )
        return layout

    def _meta(self, names: list[str], layout: Mapping[str, Any]) -> dict[str, Any]:
        """What the routers belong to: compared when a checkpoint is loaded."""
        return {
            "kind": "rankone_moe_routers",
            "models": list(names),
            **layout,
            "router_hidden_layers": self.router_hidden_layers,
            "rank_k": self.rank_k,
            "select_k": self.select_k,
            "scaling_factor": self.scaling_factor,
        }

    def _train_meta(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        return {**super()._train_meta(meta), "kind": "rankone_moe_train_state"}

    def _load_routers_checkpoint(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        path = Path(self.checkpoint).expanduser()
        path = path / CHECKPOINT_FILE if path.is_dir() else path
        return load_checkpoint(path, expect=meta, what=f"{self.name}: checkpoint")

    # ---- the model -------------------------------------------------------------------------------------
    def _build(self, modelpool: BaseModelPool, names: list[str], meta: Mapping[str, Any]) -> RankOneMoECLIPVisionModel:
        """Frozen task arithmetic (streamed per tensor), then the MLPs upscaled with rank-one experts."""
        scaling = self.scaling_factor
        merged = frozen_task_arithmetic(modelpool, names, scaling, desc=f"{self.name}: task arithmetic base")
        layers = vision_encoder_layers(merged)
        generator = torch.Generator().manual_seed(self.seed)
        dtype = next(merged.parameters()).dtype
        for index in tqdm(meta["upscaled_layers"], desc=f"{self.name}: SVD experts", leave=False, disable=None):
            mlp = layers[index].mlp
            base = {
                "fc1.weight": modelpool.get_tensor(PRETRAINED, f"encoder.layers.{index}.mlp.fc1.weight"),
                "fc2.weight": modelpool.get_tensor(PRETRAINED, f"encoder.layers.{index}.mlp.fc2.weight"),
                "fc1.bias": mlp.fc1.bias.detach(),  # task arithmetic, as the rest of the model
                "fc2.bias": mlp.fc2.bias.detach(),
            }
            experts = {key: self._experts(modelpool, names, index, key) for key in WEIGHT_KEYS}
            router = RankOneRouter(
                meta["hidden_size"],
                len(names) * self.rank_k,
                depth=self.router_hidden_layers,
                init_lambda=self.init_lambda,
                generator=generator,
            ).to(dtype)
            layers[index].mlp = RankOneMoEMLP(base, experts, mlp.activation_fn, router, select_k=self.select_k)
        return RankOneMoECLIPVisionModel(
            merged, upscaled_layers=meta["upscaled_layers"], meta=meta, batch_reduce=self.batch_reduce
        )

    def _experts(self, modelpool: BaseModelPool, names: list[str], layer: int, key: str) -> RankOneExperts:
        """The rank-one experts of layer ``layer``'s ``key`` (``fc1``/``fc2``) weight, in the pool's dtype."""
        full = f"encoder.layers.{layer}.mlp.{key}.weight"
        theta0 = modelpool.get_tensor(PRETRAINED, full)
        dtype = compute_dtype(theta0.dtype)
        taus = [modelpool.get_tensor(n, full).to(dtype) - theta0.to(dtype) for n in names]
        experts = rank_one_experts(taus, self.rank_k, device=self.svd_accelerator)
        return RankOneExperts(experts.left.to(theta0.dtype), experts.right.to(theta0.dtype))
