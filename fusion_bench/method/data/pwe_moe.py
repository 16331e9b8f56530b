"""``pwe_moe``: Pareto weight-ensembling MoE, one model that spans the Pareto front of the tasks.

Tang et al., *Towards Efficient Pareto Set Approximation via Mixture of Experts Based Model Fusion*, 2024.
https://arxiv.org/abs/2406.09770

Steps (the reference's CLIP defaults, ``config/method/pwe_moe/pwe_moe_ls_for_clip.yaml``; docs/algorithms.md):

1. every tensor that is not upscaled is task arithmetic of the pool, ``θ0 + λ Σi τi`` with ``λ = init_lambda``
   (0.3), frozen;
2. in every encoder layer the MLP (``upscale_mlp``) and the self-attention (``upscale_attn``) become a
   Pareto weight-ensembling module: its weights are ``W0 + Σi ri(p) τi`` (``W0`` pre-trained, ``τi`` the
   experts' task vectors of that module, no softmax), where the routing weights ``r(p)`` come from a router
   fed with the *preference vector* ``p`` over the T tasks (not with the input):
   ``Linear(T, 2T) -> ReLU -> Linear(2T, T)`` (``router_hidden_layers=2``) or ``Linear(T, T)`` (1); linear
   weights ~ N(0, 0.01²), the hidden bias 0, the output bias ``init_lambda``. Every module has its own router;
3. the routers are trained on the tasks' *labelled* train data: each step draws ``p ~ Dirichlet(alpha·1)``,
   takes one shuffled batch (16 images) per task, the cross-entropy ``Li`` of each task's zero-shot head,
   and minimises a scalarisation of ``L``: linear scalarisation ``Σi pi Li`` (``loss=linear_scalarization``)
   or the exact-Pareto-optimal (EPO) weighting (``loss=exact_pareto_optimal``); Adam (lr 1e-5) with cosine
   annealing to ``lr/10`` over ``num_steps`` (8000) steps;
4. evaluation: each preference vector of a grid on the simplex (``eval_grid_m`` points per edge; 2: the T
   one-hot vectors, the reference's default) or of ``preference_vectors`` gives one merged model
   (``W0 + Σi ri(p) τi`` folded into plain weights), evaluated by the run's task pool; the report's
   ``pwe_moe.pareto_front`` lists every preference with its per-task accuracies and ``plot_path`` draws them
   (matplotlib, imported only then). The returned model is the merge at ``return_preference`` (default:
   equal preferences), which the task pool evaluates as usual.

EPO (Mahapatra & Rajan, ICML 2020) weights the losses by the solution of a small linear program over the
Gram matrix of the per-task gradients of the routers; the reference solves it with cvxpy/GLPK, we use
SciPy's HiGHS (same programs; where an LP has several optimal vertices the two solvers may pick different
ones). Where the LP fails, both fall back to ``p / Σ p``.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench.errors import ConfigError, ModelLoadError
from fusion_bench.merge import compute_dtype
from fusion_bench.method._options import check_bool, check_choice, check_int, check_range
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.method.data.base import fabric_or_cpu, log_metrics
from fusion_bench.method.task_vector.task_arithmetic import frozen_task_arithmetic
from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers
from fusion_bench.modelpool import PRETRAINED, BaseModelPool
from fusion_bench.models.hf_clip import CLIPVisionModelWrapper, vision_encoder_layers
from fusion_bench.models.wemoe import adopt_saved_routers, copy_router_state
from fusion_bench.utils.checkpoint import load_checkpoint, save_checkpoint
from fusion_bench.utils.instantiate import to_container
from fusion_bench.utils.io import atomic_write, check_output_path
from fusion_bench.utils.paths import optional_path

__all__ = [
    "PreferenceRouter",
    "ParetoWeightEnsemblingModule",
    "PWEMoECLIPVisionModel",
    "PWEMoEAlgorithm",
    "simplex_grid",
    "linear_scalarization",
    "epo_loss_weights",
    "plot_pareto_front",
]

log = logging.getLogger(__name__)

NAME = "pwe_moe"
LOSSES = ("linear_scalarization", "exact_pareto_optimal")
ROUTER_DEPTHS = (1, 2)
PLOT_FORMATS = ("png", "pdf", "svg")
UPSCALED_PARTS = {"upscale_mlp": "mlp", "upscale_attn": "self_attn"}
SUM_TOLERANCE = 1e-6


# ---- preference vectors ------------------------------------------------------------------------------
def simplex_grid(n: int, m: int) -> list[list[float]]:
    """Every point of the simplex in ``n`` dimensions whose coordinates are multiples of ``1 / (m - 1)``.

    ``m`` points per edge (``m = 2``: the ``n`` one-hot vectors); ``C(n + m - 2, n - 1)`` points, ordered
    from the first coordinate's largest value down (``simplex_grid(2, 3) == [[1, 0], [0.5, 0.5], [0, 1]]``).
    """
    steps = m - 1
    points = []
    for bars in itertools.combinations(range(steps + n - 1), n - 1):  # stars and bars
        edges = (-1, *bars, steps + n - 1)
        points.append([(edges[i + 1] - edges[i] - 1) / steps for i in range(n)])
    return sorted(points, reverse=True)


def check_preference(method: str, option: str, value: Any, num_tasks: int) -> list[float]:
    """``value`` as a list of ``num_tasks`` non-negative numbers summing to 1, else a ConfigError."""
    value = to_container(value)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{method}: option {option!r} must be a list of {num_tasks} numbers; got {value!r}")
    if len(value) != num_tasks:
        raise ConfigError(
            f"{method}: option {option!r} must have one entry per model of the pool ({num_tasks}); got {list(value)!r}"
        )
    numbers = [check_range(method, option, v, low=0.0) for v in value]
    if abs(sum(numbers) - 1.0) > SUM_TOLERANCE:
        raise ConfigError(f"{method}: option {option!r} must sum to 1 (a point of the simplex); got {list(value)!r}")
    return numbers


def base_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first parameter."""
    return next(module.parameters()).dtype


# ---- the module -----------------------------------------------------------------------------------------
class PreferenceRouter(nn.Module):
    """Preference vector ``p`` (T,) -> routing weights (T,).

    Depth 2 (reference default): ``Linear(T, 2T) -> ReLU -> Linear(2T, T)``; depth 1: ``Linear(T, T)``. Linear
    weights ~ N(0, 0.01²), the hidden bias 0, the output bias ``init_lambda`` (so every routing weight starts
    near ``init_lambda`` whatever ``p``).
    """

    def __init__(
        self, num_experts: int, *, depth: int = 2, init_lambda: float = 0.3, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self.depth = depth
        if depth == 2:
            self.fc1 = nn.Linear(num_experts, 2 * num_experts)
            nn.init.normal_(self.fc1.weight, std=0.01, generator=generator)
            nn.init.zeros_(self.fc1.bias)
        self.fc2 = nn.Linear(2 * num_experts if depth == 2 else num_experts, num_experts)
        nn.init.normal_(self.fc2.weight, std=0.01, generator=generator)
        nn.init.constant_(self.fc2.bias, float(init_lambda))

    def forward(self, preference: Tensor) -> Tensor:
        hidden = F.relu(self.fc1(preference)) if self.depth == 2 else preference
        return self.fc2(hidden)


class ParetoWeightEnsemblingModule(nn.Module):
    """A module whose weights are ``W0 + Σi ri(p) τi`` for the preference ``p`` set by :meth:`set_preference`.

    Args:
        base: the module with the pre-trained weights (adopted and frozen; it runs the forward).
        task_vectors: ``{name in base.state_dict(): (T, *shape)}``, the experts' task vectors of that tensor.
        router: the preference router.
    """

    def __init__(self, base: nn.Module, task_vectors: Mapping[str, Tensor], router: PreferenceRouter) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.names = list(task_vectors)
        self.task_vectors = nn.ParameterList(nn.Parameter(task_vectors[n], requires_grad=False) for n in self.names)
        self.num_experts = int(self.task_vectors[0].shape[0])
        self.router = router
        self.preference: Tensor | None = None
        self._merged: dict[str, Tensor] | None = None
        self._merged_for: tuple[int, ...] | None = None  # the router parameters' versions the cache was made with

    def set_preference(self, preference: Tensor) -> None:
        """Set ``p`` (T,) and drop the cached merged weights."""
        if preference.dim() != 1 or preference.shape[0] != self.num_experts:
            raise ValueError(
                f"a preference vector of {self.num_experts} entries is needed; got {tuple(preference.shape)}"
            )
        self.preference = preference
        self._merged = None

    def routing_weights(self) -> Tensor:
        """``r(p)``, (T,)."""
        if self.preference is None:
            raise RuntimeError("no preference vector set: call set_preference first")
        fc2 = self.router.fc2.weight
        return self.router(self.preference.to(device=fc2.device, dtype=fc2.dtype))

    def merged_tensors(self) -> dict[str, Tensor]:
        """``{name: W0 + Σi ri τi}`` (differentiable in the router's parameters)."""
        routing = self.routing_weights()
        own = dict(self.base.named_parameters())
        return {
            n: own[n] + torch.tensordot(routing.to(tv.dtype), tv, dims=1)
            for n, tv in zip(self.names, self.task_vectors)
        }

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # merged once per preference and router state (in training: once per step, shared by the tasks' batches)
        versions = tuple(p._version for p in self.router.parameters())
        if self._merged is None or self._merged_for != versions:
            self._merged, self._merged_for = self.merged_tensors(), versions
        return torch.func.functional_call(self.base, self._merged, args, kwargs)

    @torch.no_grad()
    def merged_module(self) -> nn.Module:
        """A plain copy of the base module holding the merged weights for the current preference."""
        module = copy.deepcopy(self.base)
        own = dict(module.named_parameters())
        for name, tensor in self.merged_tensors().items():
            own[name].copy_(tensor.to(own[name].dtype))
        return module


class PWEMoECLIPVisionModel(CLIPVisionModelWrapper):
    """A CLIP vision encoder whose MLPs / attentions are :class:`ParetoWeightEnsemblingModule` s.

    Args:
        vision_model: the frozen task-arithmetic ``CLIPVisionModel`` whose modules were replaced.
        upscaled: ``{"layers.<i>.<mlp|self_attn>": module}``.
        meta: what the routers belong to (the pool's models, the architecture), saved with them.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        upscaled: Mapping[str, ParetoWeightEnsemblingModule],
        *,
        meta: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.upscaled = dict(upscaled)  # the same modules as inside vision_model (not registered twice)
        self.meta = dict(meta)

    def forward(self, pixel_values: Tensor | None = None, **kwargs: Any) -> Any:
        return self.vision_model(pixel_values=pixel_values, **kwargs)

    def set_preference(self, preference: Sequence[float] | Tensor) -> None:
        """Set the preference vector of every upscaled module."""
        preference = torch.as_tensor(preference, dtype=torch.float32)
        for module in self.upscaled.values():
            module.set_preference(preference)

    @torch.no_grad()
    def merged_model(self, preference: Sequence[float] | Tensor) -> nn.Module:
        """A plain ``CLIPVisionModel`` with every upscaled module folded for ``preference`` (the task
        vectors are not copied)."""
        self.set_preference(preference)
        memo = {id(m): m.merged_module() for m in self.upscaled.values()}
        return copy.deepcopy(self.vision_model, memo).eval()

    def router_state_dict(self) -> dict[str, Tensor]:
        """The routers' tensors (CPU copies), ``layers.3.mlp.fc2.bias`` ..."""
        return {
            f"{name}.{k}": v.detach().cpu().clone()
            for name, m in self.upscaled.items()
            for k, v in m.router.state_dict().items()
        }

    def load_router_state_dict(self, state: Mapping[str, Tensor], *, what: str) -> None:
        """Load what :meth:`router_state_dict` returned, strictly (a mismatch is a ModelLoadError)."""
        own = {f"{name}.{k}": v for name, m in self.upscaled.items() for k, v in m.router.state_dict().items()}
        copy_router_state(own, state, what=what)
        for module in self.upscaled.values():
            module._merged = None


# ---- scalarisations ------------------------------------------------------------------------------------
def linear_scalarization(losses: Tensor, preference: Tensor) -> Tensor:
    """``Σi pi Li``."""
    return (losses * preference.to(losses.dtype)).sum()


def _epo_adjustments(losses: np.ndarray, preference: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """``rl = p ⊙ l``, its non-uniformity ``μ = Σ l̂ log(T l̂)`` (``l̂ = rl / Σ rl``, over ``l̂ > eps``) and the
    adjustments ``a = p ⊙ (log(T l̂) − μ)``."""
    rl = preference * losses
    shares = rl / rl.sum()
    t = len(losses)
    positive = shares[shares > np.finfo(shares.dtype).eps]
    mu = float(np.sum(positive * np.log(positive * t)))
    return rl, mu, preference * (np.log(shares * t) - mu)


def _solve_lp(
    objective: np.ndarray, gram: np.ndarray, lower: np.ndarray, extra: tuple | None = None
) -> np.ndarray | None:
    """``argmax objective·α`` over the simplex with ``(G α)_j ≥ lower_j`` (rows with ``-inf`` dropped) and an
    optional ``extra = (c, b)``: ``c·α ≥ b``; None if the LP has no solution."""
    from scipy.optimize import linprog

    rows = np.isfinite(lower)
    a_ub, b_ub = [-gram[rows]], [-lower[rows]]
    if extra is not None:
        a_ub.append(-extra[0][None, :])
        b_ub.append(np.array([-extra[1]]))
    t = len(objective)
    result = linprog(
        -objective,
        A_ub=np.concatenate(a_ub),
        b_ub=np.concatenate(b_ub),
        A_eq=np.ones((1, t)),
        b_eq=np.array([1.0]),
        bounds=[(0, None)] * t,
        method="highs",
    )
    return result.x if result.success else None


def epo_loss_weights(losses: np.ndarray, preference: np.ndarray, gram: np.ndarray, *, eps: float = 1e-4) -> np.ndarray:
    """The EPO weights of the losses (``T·α``, to multiply the losses by).

    Args:
        losses: (T,) the current losses (positive).
        preference: (T,) the preference ray.
        gram: (T, T) inner products of the per-task gradients.
        eps: non-uniformity below which the step only descends (the "dominance" LP).

    Returns:
        ``T·α`` with α from the balance LP (``μ > eps``) or the dominance LP, or ``T·p/Σp`` when it fails.
    """
    t = len(losses)
    fallback = t * preference / preference.sum()
    if not np.all(np.isfinite(losses)) or np.any(preference * losses <= 0):
        return fallback
    rl, mu, adjustments = _epo_adjustments(losses, preference)
    ca = gram @ adjustments
    if mu > eps:  # balance: move towards the preference ray
        lower = ca.copy()
        if np.any(ca > 0):
            lower[ca > 0] = -np.inf
            lower[rl == rl.max()] = 0.0
        else:
            lower = np.zeros_like(ca)
        alpha = _solve_lp(ca, gram, lower)
    else:  # on the ray: descend without leaving it
        alpha = _solve_lp(gram.sum(axis=0), gram, np.zeros(t), extra=(ca, min(float(ca.max()), 0.0)))
    return fallback if alpha is None else t * alpha


def exact_pareto_optimal(losses: Tensor, preference: Tensor, parameters: Sequence[Tensor]) -> Tensor:
    """``Σi wi Li`` with ``w = epo_loss_weights`` (constants) from the gradients of each ``Li`` in ``parameters``."""
    grads = []
    for loss in losses:
        g = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
        grads.append(torch.cat([x.flatten() for x in g if x is not None]))
    stacked = torch.stack(grads).double()
    gram = (stacked @ stacked.T).cpu().numpy()
    weights = epo_loss_weights(losses.detach().double().cpu().numpy(), preference.detach().double().cpu().numpy(), gram)
    return (losses * torch.as_tensor(weights, dtype=losses.dtype, device=losses.device)).sum()


# ---- the figure --------------------------------------------------------------------------------------------
def _non_dominated(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (maximising), by the first coordinate."""
    keep = [
        i
        for i, (x, y) in enumerate(points)
        if not any(a >= x and b >= y and (a > x or b > y) for j, (a, b) in enumerate(points) if j != i)
    ]
    return sorted(keep, key=lambda i: points[i][0])


def plot_pareto_front(
    path: str | Path, front: Sequence[Mapping[str, Any]], tasks: Sequence[str], *, title: str
) -> Path:
    """The accuracies of the merged models across preferences.

    Left: accuracy (%) of ``tasks[0]`` vs ``tasks[1]``, one point per preference vector, coloured by the share
    of the preference on ``tasks[0]`` among the two, the non-dominated points joined (the front). Right, with
    more than two tasks: every task's accuracy, one line per preference vector.

    Args:
        path: the figure file (format from its suffix; written atomically).
        front: the ``pareto_front`` entries of the report (``preference``, ``tasks``).
        tasks: the pair of tasks of the left panel, then (right panel) all the tasks.
        title: the figure's title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a, b = tasks[0], tasks[1]
    many = len(front[0]["tasks"]) > 2
    fig = Figure(figsize=(10.5 if many else 5.2, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if many else 1, 1)
    xy = [(100 * e["tasks"][a]["accuracy"], 100 * e["tasks"][b]["accuracy"]) for e in front]
    share = [
        e["preference"][a] / (e["preference"][a] + e["preference"][b])
        if e["preference"][a] + e["preference"][b] > 0
        else 0.5
        for e in front
    ]
    dots = ax.scatter([p[0] for p in xy], [p[1] for p in xy], c=share, cmap="viridis", vmin=0, vmax=1, zorder=3)
    best = _non_dominated(xy)
    ax.plot([xy[i][0] for i in best], [xy[i][1] for i in best], "-", color="grey", alpha=0.6, label="non-dominated")
    fig.colorbar(dots, ax=ax, label=f"preference share of {a!r}")
    ax.set_xlabel(f"{a} accuracy (%)")
    ax.set_ylabel(f"{b} accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if many:
        names = list(front[0]["tasks"])
        right = fig.add_subplot(1, 2, 2)
        for entry in front:
            label = "p = (" + ", ".join(f"{entry['preference'][t]:.2g}" for t in names) + ")"
            right.plot(range(len(names)), [100 * entry["tasks"][t]["accuracy"] for t in names], "o-", label=label)
        right.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        right.set_ylabel("accuracy (%)")
        right.grid(alpha=0.3)
        if len(front) <= 12:
            right.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    suffix = Path(path).suffix.lstrip(".").lower()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format=suffix, dpi=120)
    return Path(path)


# ---- the algorithm ------------------------------------------------------------------------------------------
def _check_dataloader_kwargs(value: Any) -> dict[str, int]:
    given = to_container(value) or {}
    if not isinstance(given, Mapping):
        raise ConfigError(f"{NAME}: option 'dataloader_kwargs' must be a mapping; got {given!r}")
    unknown = sorted(set(given) - {"batch_size", "num_workers"})
    if unknown:
        raise ConfigError(f"{NAME}: unknown dataloader_kwargs {unknown}; valid: batch_size, num_workers")
    kwargs = {"batch_size": 16, "num_workers": 0, **given}
    return {
        "batch_size": check_int(NAME, "dataloader_kwargs.batch_size", kwargs["batch_size"], low=1),
        "num_workers": check_int(NAME, "dataloader_kwargs.num_workers", kwargs["num_workers"], low=0),
    }


@register_algorithm(NAME)
class PWEMoEAlgorithm(BaseAlgorithm):
    """Pareto weight-ensembling MoE for a CLIP vision model pool (see the module docstring).

    Args:
        loss: ``"linear_scalarization"`` (``Σ pi Li``) or ``"exact_pareto_optimal"`` (EPO).
        upscale_mlp: upscale every encoder layer's MLP.
        upscale_attn: upscale every encoder layer's self-attention.
        init_lambda: λ of the frozen task arithmetic of the other tensors, and the routers' initial output.
        router_hidden_layers: 2 (``Linear(T, 2T) -> ReLU -> Linear(2T, T)``) or 1 (``Linear(T, T)``).
        lr: Adam's learning rate (cosine-annealed to ``lr / 10``).
        num_steps: training steps (one labelled batch per task each).
        alpha: the Dirichlet concentration of the preference vectors drawn in training (1: uniform on the simplex).
        dataloader_kwargs: ``batch_size`` (images per task per step) and ``num_workers``.
        seed: seeds the routers' initialisation, the preference draws and the batches' order.
        checkpoint_path: routers saved by ``save_checkpoint`` to evaluate; skips training.
        save_checkpoint: where to write the trained routers (atomically).
        save_interval: write the resumable training state every this many steps (0: never).
        train_state_path: that state's file (None: ``<save_checkpoint>.train_state``, none without save_checkpoint);
            a rerun with the same options resumes from it and gives the routers of an uninterrupted run.
        eval_grid: evaluate the grid of preference vectors (else only ``preference_vectors``, if given).
        eval_grid_n: the grid's dimension; null: the number of models (any other value is refused).
        eval_grid_m: grid points per edge of the simplex (2: the one-hot vectors).
        preference_vectors: preference vectors to evaluate instead of the grid (each: T entries ≥ 0 summing to 1).
        return_preference: the preference of the returned model (null: equal, 1/T each).
        plot_path: write the front there (``.png``, ``.pdf``, ``.svg``).
        plot_tasks: the two tasks of the front's axes (null: the pool's first two).
        clip_model: the full CLIP giving the text tower, projection and logit scale (null: ``_pretrained_``).
    """

    def __init__(
        self,
        *,
        loss: str = "linear_scalarization",
        upscale_mlp: bool = True,
        upscale_attn: bool = True,
        init_lambda: float = 0.3,
        router_hidden_layers: int = 2,
        lr: float = 1e-5,
        num_steps: int = 8000,
        alpha: float = 1.0,
        dataloader_kwargs: Any = None,
        seed: int = 42,
        checkpoint_path: str | None = None,
        save_checkpoint: str | None = None,
        save_interval: int = 2000,
        train_state_path: str | None = None,
        eval_grid: bool = True,
        eval_grid_n: int | None = None,
        eval_grid_m: int = 2,
        preference_vectors: Any = None,
        return_preference: Any = None,
        plot_path: str | None = None,
        plot_tasks: Any = None,
        clip_model: Any = None,
    ) -> None:
        self.loss = check_choice(NAME, "loss", loss, LOSSES)
        self.upscale_mlp = check_bool(NAME, "upscale_mlp", upscale_mlp)
        self.upscale_attn = check_bool(NAME, "upscale_attn", upscale_attn)
        if not (self.upscale_mlp or self.upscale_attn):
            raise ConfigError(f"{NAME}: options 'upscale_mlp' and 'upscale_attn' are both false: nothing to upscale")
        self.init_lambda = check_range(NAME, "init_lambda", init_lambda)
        self.router_hidden_layers = check_int(NAME, "router_hidden_layers", router_hidden_layers)
        if self.router_hidden_layers not in ROUTER_DEPTHS:
            raise ConfigError(f"{NAME}: option 'router_hidden_layers' must be 1 or 2; got {router_hidden_layers!r}")
        self.lr = check_range(NAME, "lr", lr, low=0.0, low_open=True)
        self.num_steps = check_int(NAME, "num_steps", num_steps)
        self.alpha = check_range(NAME, "alpha", alpha, low=0.0, low_open=True)
        self.dataloader_kwargs = _check_dataloader_kwargs(dataloader_kwargs)
        self.seed = check_int(NAME, "seed", seed)
        self.checkpoint_path = optional_path(checkpoint_path, f"{NAME}: option 'checkpoint_path'")
        self.save_checkpoint = optional_path(save_checkpoint, f"{NAME}: option 'save_checkpoint'")
        self.save_interval = check_int(NAME, "save_interval", save_interval)
        default_state = f"{self.save_checkpoint}.train_state" if self.save_checkpoint else None
        self.train_state_path = optional_path(train_state_path, f"{NAME}: option 'train_state_path'") or default_state
        self.eval_grid = check_bool(NAME, "eval_grid", eval_grid)
        self.eval_grid_n = None if eval_grid_n is None else check_int(NAME, "eval_grid_n", eval_grid_n, low=1)
        self.eval_grid_m = check_int(NAME, "eval_grid_m", eval_grid_m, low=2)
        self.preference_vectors = self._list_option("preference_vectors", preference_vectors, nested=True)
        self.return_preference = self._list_option("return_preference", return_preference)
        self.plot_tasks = self._list_option("plot_tasks", plot_tasks)
        if self.plot_tasks is not None and (len(self.plot_tasks) != 2 or len(set(self.plot_tasks)) != 2):
            raise ConfigError(f"{NAME}: option 'plot_tasks' must name two different tasks; got {plot_tasks!r}")
        self.plot_path = None
        if plot_path is not None:
            suffix = Path(str(plot_path)).suffix.lstrip(".").lower()
            if suffix not in PLOT_FORMATS:
                raise ConfigError(
                    f"{NAME}: option 'plot_path' must end in {', '.join('.' + f for f in PLOT_FORMATS)}; got {plot_path!r}"
                )
            if not self.eval_grid and self.preference_vectors is None:
                raise ConfigError(f"{NAME}: option 'plot_path' needs eval_grid=true or preference_vectors")
            self.plot_path = str(check_output_path(plot_path, option="method.plot_path"))
        self.clip_model = to_container(clip_model)
        self._history: list[float] = []
        self._report: dict[str, Any] = {}
        self._resumed_from = 0
        self._seconds_per_step: float | None = None

    @staticmethod
    def _list_option(option: str, value: Any, *, nested: bool = False) -> list | None:
        value = to_container(value)
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
            kind = "a non-empty list of lists" if nested else "a non-empty list"
            raise ConfigError(f"{NAME}: option {option!r} must be {kind}; got {value!r}")
        return [list(v) if nested and isinstance(v, Sequence) and not isinstance(v, str) else v for v in value]

    # ---- checks before any work ---------------------------------------------------------------
    def _preferences(self, names: list[str]) -> tuple[list[list[float]], list[float]]:
        """The preference vectors to evaluate and the returned model's, checked against the pool."""
        t = len(names)
        if self.eval_grid_n is not None and self.eval_grid_n != t:
            raise ConfigError(
                f"{NAME}: option 'eval_grid_n' is {self.eval_grid_n} but the pool has {t} models (leave it null)"
            )
        if self.preference_vectors is not None:
            front = [check_preference(NAME, "preference_vectors", p, t) for p in self.preference_vectors]
        else:
            front = simplex_grid(t, self.eval_grid_m) if self.eval_grid else []
        if len(front) > 10_000:
            raise ConfigError(
                f"{NAME}: eval_grid_m={self.eval_grid_m} gives {len(front)} preference vectors for {t} tasks; "
                f"lower it or list preference_vectors"
            )
        returned = (
            [1.0 / t] * t
            if self.return_preference is None
            else check_preference(NAME, "return_preference", self.return_preference, t)
        )
        return front, returned

    def _front_taskpool(self, front: list[list[float]], names: list[str]) -> Any:
        """The task pool that evaluates the front (None: no front), checked before any work."""
        taskpool = getattr(self, "taskpool", None)
        tasks = list(getattr(taskpool, "task_names", None) or [])
        if not front:
            return None
        if not tasks:
            if self.plot_path is not None:
                raise ConfigError(
                    f"{NAME}: option 'plot_path' needs a task pool that evaluates tasks "
                    f"(got {type(taskpool).__name__ if taskpool is not None else 'none'})"
                )
            log.warning("%s: no task pool with tasks; the preference vectors are not evaluated", NAME)
            return None
        if self.plot_path is not None:
            pair = self.plot_tasks or tasks[:2]
            if len(tasks) < 2 and self.plot_tasks is None:
                raise ConfigError(f"{NAME}: option 'plot_path' needs at least two tasks in the task pool; got {tasks}")
            unknown = [p for p in pair if p not in tasks or p not in names]
            if unknown:
                raise ConfigError(
                    f"{NAME}: option 'plot_tasks' names {unknown[0]!r}, not both a model of the pool {names} "
                    f"and a task of the task pool {tasks}"
                )
        return taskpool

    def _layout(self, modelpool: BaseModelPool) -> dict[str, Any]:
        import re

        pattern = re.compile(r"encoder\.layers\.(\d+)\.mlp\.fc1\.weight")
        layers = sorted(int(m.group(1)) for k in modelpool.keys(PRETRAINED) if (m := pattern.fullmatch(k)))
        if not layers:
            raise ModelLoadError(
                f"{NAME}: model {PRETRAINED!r} has no CLIP encoder layers ('encoder.layers.<i>.mlp.fc1.weight')"
            )
        parts = [part for option, part in UPSCALED_PARTS.items() if getattr(self, option)]
        return {"num_layers": len(layers), "layers": layers, "parts": parts}

    def _meta(self, names: list[str], layout: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "kind": "pwe_moe_routers",
            "models": list(names),
            **layout,
            "router_hidden_layers": self.router_hidden_layers,
            "init_lambda": self.init_lambda,
        }

    def _train_meta(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """A training state also needs the same training options to be resumed."""
        training = {k: getattr(self, k) for k in ("loss", "lr", "num_steps", "alpha", "seed")}
        return {**meta, "kind": "pwe_moe_train_state", **training, "batch_size": self.dataloader_kwargs["batch_size"]}

    def _load_train_state(self, meta: Mapping[str, Any]) -> dict[str, Any] | None:
        if self.train_state_path is None or not Path(self.train_state_path).is_file():
            return None
        try:
            return load_checkpoint(self.train_state_path, expect=self._train_meta(meta), what=f"{NAME}: train state")
        except ConfigError as err:
            raise ConfigError(f"{err}; delete it to start over, or set method.train_state_path") from None

    # ---- run ------------------------------------------------------------------------------------------------
    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """Build the upscaled model, load or train its routers, evaluate the preferences; return the merge at
        ``return_preference``."""
        names = modelpool.model_names
        if len(names) < 2 or not modelpool.has_pretrained:
            raise ConfigError(
                f"{NAME}: needs a {PRETRAINED!r} model and at least two fine-tuned models; the pool has "
                f"{modelpool.all_model_names}"
            )
        front, returned = self._preferences(names)
        taskpool = self._front_taskpool(front, names)
        meta = self._meta(names, self._layout(modelpool))
        heads = CLIPTaskClassifiers(modelpool, clip_model=self.clip_model, what=NAME)
        loaded = resume = None
        if self.checkpoint_path is not None:  # validated before any heavy work
            loaded = load_checkpoint(self.checkpoint_path, expect=meta, what=f"{NAME}: checkpoint")
        elif self.num_steps > 0:
            heads.check_tasks("train", names)
            resume = self._load_train_state(meta)
        model = self.build(modelpool, names, meta)
        checkpoint, state = (
            f"{NAME}: checkpoint {self.checkpoint_path!r}",
            f"{NAME}: train state {self.train_state_path!r}",
        )
        if not adopt_saved_routers(model, loaded, resume, what=checkpoint, state=state):
            self._train(model, heads, names, resume)
            if self.save_checkpoint is not None and (self.fabric is None or self.fabric.is_global_zero):
                save_checkpoint(self.save_checkpoint, {"routers": model.router_state_dict()}, meta=model.meta)
        evaluations = self._evaluate_front(model, taskpool, names, front)
        self._report = {NAME: self._summary(names, returned, evaluations)}
        if self.plot_path is not None and evaluations:
            pair = self.plot_tasks or list(taskpool.task_names)[:2]
            plot_pareto_front(
                self.plot_path, evaluations, pair, title=f"{NAME} ({self.loss}): {len(front)} preferences"
            )
        return model.merged_model(returned)

    def build(self, modelpool: BaseModelPool, names: list[str], meta: Mapping[str, Any]) -> PWEMoECLIPVisionModel:
        """The frozen task arithmetic (λ = init_lambda), then the MLPs / attentions upscaled (routers seeded)."""
        scaling = self.init_lambda
        merged = frozen_task_arithmetic(modelpool, names, scaling, desc=f"{NAME}: task arithmetic base")
        layers = vision_encoder_layers(merged)
        generator = torch.Generator().manual_seed(self.seed)
        upscaled = {}
        for index in tqdm(meta["layers"], desc=f"{NAME}: upscaling", leave=False, disable=None):
            for part in meta["parts"]:
                router = PreferenceRouter(
                    len(names), depth=self.router_hidden_layers, init_lambda=self.init_lambda, generator=generator
                )
                prefix = f"encoder.layers.{index}.{part}"
                module = self._upscale(modelpool, names, getattr(layers[index], part), prefix, router)
                setattr(layers[index], part, module)
                upscaled[f"layers.{index}.{part}"] = module
        return PWEMoECLIPVisionModel(merged, upscaled, meta=meta)

    @staticmethod
    def _upscale(
        modelpool: BaseModelPool, names: list[str], module: nn.Module, prefix: str, router: PreferenceRouter
    ) -> ParetoWeightEnsemblingModule:
        """``module`` (of the merged model) with its pre-trained tensors, the experts' task vectors and ``router``."""
        base = copy.deepcopy(module)
        vectors = {}
        with torch.no_grad():
            for name, param in base.named_parameters():
                key = f"{prefix}.{name}"
                theta0 = modelpool.get_tensor(PRETRAINED, key)
                dtype = compute_dtype(theta0.dtype)
                param.copy_(theta0)
                taus = [modelpool.get_tensor(n, key).to(dtype) - theta0.to(dtype) for n in names]
                vectors[name] = torch.stack(taus).to(param.dtype)  # (T, *shape)
        return ParetoWeightEnsemblingModule(base, vectors, router.to(base_dtype(base)))

    # ---- training -----------------------------------------------------------------------------------------
    def _train(
        self,
        model: PWEMoECLIPVisionModel,
        heads: CLIPTaskClassifiers,
        names: list[str],
        resume: Mapping[str, Any] | None = None,
    ) -> None:
        """Adam over the routers: per step a Dirichlet preference, one labelled batch per task, the scalarised
        cross-entropies; from ``resume`` (a training state) if given."""
        if self.num_steps == 0:
            return
        fabric = fabric_or_cpu(self.fabric)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        module, optimizer = fabric.setup(model, optimizer)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.num_steps, eta_min=self.lr * 0.1)
        start = self._apply_resume(model, optimizer, scheduler, resume)
        classifiers = {t: heads.classifier(module, t).to(fabric.device) for t in names}
        streams = heads.test_time_batches(
            names,
            batch_size=self.dataloader_kwargs["batch_size"],
            seed=self.seed,
            num_workers=self.dataloader_kwargs["num_workers"],
            split="train",
            start=start,  # a resumed run skips the batches used (indices only)
        )
        rng = np.random.default_rng(self.seed)
        for _ in range(start):  # replay the preferences drawn before the interruption
            rng.dirichlet([self.alpha] * len(names))
        dtype = next(model.parameters()).dtype
        model.train()
        began = time.perf_counter()
        for step in tqdm(range(start, self.num_steps), initial=start, total=self.num_steps, desc=NAME, disable=None):
            preference = torch.from_numpy(rng.dirichlet([self.alpha] * len(names)).astype(np.float32))
            model.set_preference(preference)
            losses = []
            for task in names:
                images, labels = next(streams[task])
                logits = classifiers[task](images.to(device=fabric.device, dtype=dtype))
                losses.append(F.cross_entropy(logits.float(), labels.to(fabric.device)))
            stacked = torch.stack(losses)
            ray = preference.to(fabric.device)
            if self.loss == "linear_scalarization":
                loss = linear_scalarization(stacked, ray)
            else:
                loss = exact_pareto_optimal(stacked, ray, params)
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            scheduler.step()
            self._history.append(float(loss.item()))
            log_metrics(fabric, {"train/loss": self._history[-1]}, step=step + 1)
            self._after_step(step + 1, model, optimizer, scheduler)
        model.eval()
        if self.train_state_path is not None and fabric.is_global_zero:
            Path(self.train_state_path).unlink(missing_ok=True)  # the final routers supersede it
        steps = self.num_steps - start
        self._seconds_per_step = (time.perf_counter() - began) / steps if steps else None

    def _apply_resume(self, model: PWEMoECLIPVisionModel, optimizer: Any, scheduler: Any, resume: Any) -> int:
        """Load a training state; return the step it was written after (0 without one)."""
        if resume is None:
            return 0
        model.load_router_state_dict(resume["routers"], what=f"{NAME}: train state {self.train_state_path!r}")
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        self._history = resume["history"].tolist()
        self._resumed_from = min(int(resume["step"]), self.num_steps)
        log.info("%s: resumed from step %d of %s", NAME, self._resumed_from, self.train_state_path)
        return self._resumed_from

    def _after_step(self, step: int, model: PWEMoECLIPVisionModel, optimizer: Any, scheduler: Any) -> None:
        """Called after every step: the periodic resumable state."""
        periodic = self.save_interval and step % self.save_interval == 0 and step < self.num_steps
        if not periodic or self.train_state_path is None or not (self.fabric is None or self.fabric.is_global_zero):
            return
        state = {
            "step": step,
            "routers": model.router_state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": torch.tensor(self._history, dtype=torch.float64),
        }
        save_checkpoint(self.train_state_path, state, meta=self._train_meta(model.meta))

    # ---- evaluation ------------------------------------------------------------------------------------------
    @staticmethod
    def _evaluate_front(
        model: PWEMoECLIPVisionModel, taskpool: Any, names: list[str], front: list[list[float]]
    ) -> list[dict[str, Any]]:
        """Each preference's merged model evaluated by ``taskpool``."""
        if taskpool is None:
            return []
        evaluations = []
        for preference in tqdm(front, desc=f"{NAME}: preferences", disable=None):
            report = taskpool.evaluate(model.merged_model(preference))
            tasks = {
                k: dict(v)
                for k, v in report.items()
                if k not in ("average", "model_info") and isinstance(v, Mapping) and "accuracy" in v
            }
            evaluations.append(
                {"preference": dict(zip(names, preference)), "tasks": tasks, "average": report.get("average")}
            )
        return evaluations

    def _summary(self, names: list[str], returned: list[float], evaluations: list[dict[str, Any]]) -> dict[str, Any]:
        report: dict[str, Any] = {
            "loss": self.loss,
            "trained": self.checkpoint_path is None and self.num_steps > 0,
            "checkpoint_path": self.checkpoint_path,
            "num_steps": 0 if self.checkpoint_path is not None else self.num_steps,
            "returned_preference": dict(zip(names, returned)),
            "pareto_front": evaluations,
            "plot_path": self.plot_path,
        }
        if self._history:
            window = max(1, min(10, len(self._history) // 2))
            report["resumed_from_step"] = self._resumed_from
            report["seconds_per_step"] = self._seconds_per_step
            report["loss_first"] = sum(self._history[:window]) / window
            report["loss_last"] = sum(self._history[-window:]) / window
        return report

    def extra_report(self) -> dict[str, Any]:
        """``{"pwe_moe": {..., "pareto_front": [{"preference", "tasks", "average"}, ...]}}`` after ``run``."""
        return dict(self._report)
