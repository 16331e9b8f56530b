"""``clip_weight_ensembling_moe``: Weight-Ensembling Mixture of Experts for CLIP vision encoders.

Tang et al., *Merging Multi-Task Models via Weight-Ensembling Mixture of Experts*, ICML 2024.
https://arxiv.org/abs/2402.00433

Steps (reference defaults, as the published tables were made; docs/algorithms.md):

1. base = task arithmetic of the pool, ``θ0 + λ Σ τi`` with ``λ = scaling_factor`` (null: ``init_lambda``,
   0.3), frozen;
2. every encoder layer's MLP (or the last ``num_upscaled_layers``) becomes ``MLP0 + Σi wi(x) τi^MLP``
   (``MLP0`` pre-trained, no softmax) with a router per layer ``Linear(d, d) -> ReLU -> Linear(d, T)``
   (weights N(0, 0.01²), biases 0 and ``init_lambda``) fed by the MLP's token features, routing
   weights averaged over the tokens (and over the batch while training, ``batch_reduce``);
3. the routers are trained by test-time entropy minimisation: each step takes one shuffled,
   unlabelled test batch per task (16 images), sums the prediction entropies of the task's
   zero-shot head and makes one Adam step (lr 1e-4); 1000 steps.

Evaluation routes every sample on its own (the reference leaves the batch-averaged routing of
training on at evaluation, so a sample's prediction depends on its batch: a bug we avoid).

The efficient variant (``sparse_clip_weight_ensembling_moe``, ``config/method/wemoe/sparse_weight_ensembling_moe.yaml``):
each MLP task vector tensor keeps only the entries with ``|v|`` above its 0.9 quantile (about 10%
kept, ``tv_prune_ratio=0.9``) and one router is shared by all layers (``shared_gate=true``).

``save_checkpoint=`` writes the routers with meta (the pool's model names and the architecture);
``checkpoint=`` loads such a file and skips training, refusing one made for another pool or
architecture. Every ``save_interval`` steps the training state (routers, Adam, step, RNG) is written
to ``train_state_path``; a rerun with the same options resumes from it, giving the same routers as an
uninterrupted run.
"""

from __future__ import annotations

import inspect
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from fusion_bench.errors import ConfigError, ModelLoadError
from fusion_bench.merge import compute_dtype
from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers, entropy_loss
from fusion_bench.method._options import check_bool, check_choice, check_int, check_range
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.method.task_vector.task_arithmetic import frozen_task_arithmetic
from fusion_bench.modelpool import PRETRAINED, BaseModelPool
from fusion_bench.models.wemoe import (
    adopt_saved_routers,
    CHECKPOINT_FILE,
    MLP_KEYS,
    ROUTER_DEPTHS,
    MLPExperts,
    WEMoECLIPVisionModel,
    prune_task_vector,
    upscale_clip_vision_model,
)
from fusion_bench.utils.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fusion_bench.utils.instantiate import to_container
from fusion_bench.utils.paths import optional_path

__all__ = ["CLIPWeightEnsemblingMoEAlgorithm", "SparseCLIPWeightEnsemblingMoEAlgorithm", "entropy_minimisation_step"]

log = logging.getLogger(__name__)

NAME = "clip_weight_ensembling_moe"
SPARSE_NAME = "sparse_clip_weight_ensembling_moe"
OPTIMIZERS = ("adam",)
_FC1 = re.compile(r"encoder\.layers\.(\d+)\.mlp\.fc1\.weight")


def entropy_minimisation_step(
    classifiers: Mapping[str, nn.Module],
    batches: Mapping[str, Iterator[Any]],
    optimizer: torch.optim.Optimizer,
    *,
    use_grad_accumulate: bool,
    backward: Callable[[torch.Tensor], None] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, float]:
    """One test-time step: one batch per task, the sum of the prediction entropies, one optimiser step.

    Args:
        classifiers: ``{task: pixel values (B, 3, H, W) -> logits (B, C)}``.
        batches: ``{task: endless iterator of (pixel_values, labels)}`` (labels unused).
        optimizer: over the trainable parameters.
        use_grad_accumulate: backward after each task's batch (frees its graph at once; the same
            gradient) instead of once on the sum.
        backward: ``loss -> None`` (the Fabric's ``backward``); None: ``loss.backward()``.
        device / dtype: where and as what the images go.

    Returns:
        each task's entropy.
    """
    backward = backward or torch.Tensor.backward
    optimizer.zero_grad(set_to_none=True)
    entropies, total = {}, None
    for task, classifier in classifiers.items():
        pixel_values, _ = next(batches[task])
        loss = entropy_loss(classifier(pixel_values.to(device=device, dtype=dtype)))
        if use_grad_accumulate:
            backward(loss)
        else:
            total = loss if total is None else total + loss
        entropies[task] = loss.item()
    if total is not None:
        backward(total)
    optimizer.step()
    return entropies


@register_algorithm(NAME)
class CLIPWeightEnsemblingMoEAlgorithm(BaseAlgorithm):
    """WEMoE for a CLIP vision model pool (see the module docstring).

    Args:
        checkpoint: a routers checkpoint (file, or a folder holding ``wemoe.ckpt``) to evaluate; skips training.
        save_checkpoint: where to write the trained routers (atomically).
        router_hidden_layers: router depth: 2 (reference), 1 (linear) or 0 (a learned constant per layer).
        init_lambda: the routers' initial output (the initial routing weight of every expert).
        scaling_factor: λ of the frozen task-arithmetic base (None: ``init_lambda``, as the reference).
        num_upscaled_layers: upscale the MLPs of the last k encoder layers (None: every layer, the reference).
        tv_prune_ratio: share of each MLP task vector tensor's entries dropped, smallest ``|v|`` first (0: dense).
        shared_gate: one router for every upscaled layer.
        batch_reduce: while training, average routing weights over the batch (reference); evaluation is per sample.
        lr: Adam's learning rate.
        optimizer: ``"adam"``.
        max_steps: test-time training steps.
        batch_size: test images per task per step.
        use_grad_accumulate: backward per task (less memory, same gradient) instead of once on the sum.
        seed: seeds the routers' initialisation and the test batches' order.
        num_workers: DataLoader workers.
        devices: devices of the Fabric built when none is given (the CLI's comes from ``fabric.devices``).
        save_interval: write the resumable training state every this many steps (0: never).
        train_state_path: that state's file (None: ``<save_checkpoint>.train_state``, none without save_checkpoint).
        clip_model: the full CLIP giving the text tower, projection and logit scale (None: ``_pretrained_``).
    """

    def __init__(
        self,
        *,
        checkpoint: str | None = None,
        save_checkpoint: str | None = None,
        router_hidden_layers: int = 2,
        init_lambda: float = 0.3,
        scaling_factor: float | None = None,
        num_upscaled_layers: int | None = None,
        tv_prune_ratio: float = 0.0,
        shared_gate: bool = False,
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
        name = self.name
        self.checkpoint = optional_path(checkpoint, f"{name}: option 'checkpoint'")
        self.save_checkpoint = optional_path(save_checkpoint, f"{name}: option 'save_checkpoint'")
        self.router_hidden_layers = check_int(name, "router_hidden_layers", router_hidden_layers)
        if self.router_hidden_layers not in ROUTER_DEPTHS:
            raise ConfigError(
                f"{name}: option 'router_hidden_layers' must be one of {ROUTER_DEPTHS}; got {router_hidden_layers!r}"
            )
        self.init_lambda = check_range(name, "init_lambda", init_lambda)
        self.scaling_factor = (
            self.init_lambda if scaling_factor is None else check_range(name, "scaling_factor", scaling_factor)
        )
        self.num_upscaled_layers = (
            None if num_upscaled_layers is None else check_int(name, "num_upscaled_layers", num_upscaled_layers, low=1)
        )
        self.tv_prune_ratio = check_range(name, "tv_prune_ratio", tv_prune_ratio, low=0.0, high=1.0, high_open=True)
        self.shared_gate = check_bool(name, "shared_gate", shared_gate)
        self.batch_reduce = check_bool(name, "batch_reduce", batch_reduce)
        self.lr = check_range(name, "lr", lr, low=0.0, low_open=True)
        self.optimizer = check_choice(name, "optimizer", optimizer, OPTIMIZERS)
        self.max_steps = check_int(name, "max_steps", max_steps)
        self.batch_size = check_int(name, "batch_size", batch_size, low=1)
        self.use_grad_accumulate = check_bool(name, "use_grad_accumulate", use_grad_accumulate)
        self.seed = check_int(name, "seed", seed)
        self.num_workers = check_int(name, "num_workers", num_workers)
        self.devices = check_int(name, "devices", devices, low=1)
        self.save_interval = check_int(name, "save_interval", save_interval)
        default_state = f"{self.save_checkpoint}.train_state" if self.save_checkpoint else None
        self.train_state_path = optional_path(train_state_path, f"{name}: option 'train_state_path'") or default_state
        self.clip_model = to_container(clip_model)
        self._history: list[float] = []
        self._summary: dict[str, Any] = {}

    # ---- run ---------------------------------------------------------------------------------
    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """Build the WEMoE model, load or train its routers, and return it (per-sample routing)."""
        names = modelpool.model_names
        if not names or not modelpool.has_pretrained:
            raise ConfigError(
                f"{self.name}: needs a {PRETRAINED!r} model and at least one fine-tuned model; the pool has {modelpool.all_model_names}"
            )
        meta = self._meta(names, self._layout(modelpool))
        heads = CLIPTaskClassifiers(modelpool, clip_model=self.clip_model, what=self.name)
        loaded = resume = None
        if self.checkpoint is not None:  # validated before any heavy work
            loaded = self._load_routers_checkpoint(meta)
        else:
            heads.check_tasks("test", names)
            resume = self._load_train_state(meta)
        model = self._build(modelpool, names, meta)
        checkpoint, state = (
            f"{self.name}: checkpoint {self.checkpoint!r}",
            f"{self.name}: train state {self.train_state_path!r}",
        )
        if not adopt_saved_routers(model, loaded, resume, what=checkpoint, state=state):
            self._train(model, heads, names, meta, resume)
            if self.save_checkpoint is not None and self._is_global_zero():
                save_checkpoint(self.save_checkpoint, {"routers": model.router_state_dict()}, meta=model.meta)
        return model.eval()

    def _layout(self, modelpool: BaseModelPool) -> dict[str, Any]:
        """The encoder's layer count and MLP sizes (from tensor headers) and the layers to upscale."""
        layers = sorted(int(m.group(1)) for k in modelpool.keys(PRETRAINED) if (m := _FC1.fullmatch(k)))
        if not layers:
            raise ModelLoadError(
                f"{self.name}: model {PRETRAINED!r} has no CLIP encoder MLPs ('encoder.layers.<i>.mlp.fc1.weight')"
            )
        count = self.num_upscaled_layers or len(layers)
        if count > len(layers):
            raise ConfigError(
                f"{self.name}: option 'num_upscaled_layers' is {count} but the model has {len(layers)} encoder layers"
            )
        (intermediate, hidden), _ = modelpool.tensor_source(PRETRAINED).shape_dtype(
            f"encoder.layers.{layers[0]}.mlp.fc1.weight"
        )
        return {
            "num_layers": len(layers),
            "hidden_size": int(hidden),
            "intermediate_size": int(intermediate),
            "upscaled_layers": layers[len(layers) - count :],
        }

    def _meta(self, names: list[str], layout: Mapping[str, Any]) -> dict[str, Any]:
        """What the routers belong to: compared when a checkpoint is loaded."""
        return {
            "kind": "wemoe_routers",
            "models": list(names),
            **layout,
            "router_hidden_layers": self.router_hidden_layers,
            "shared_gate": self.shared_gate,
            "tv_prune_ratio": self.tv_prune_ratio,
            "scaling_factor": self.scaling_factor,
        }

    def _train_meta(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """A training state also needs the same training hyperparameters to be resumed."""
        training = {
            k: getattr(self, k)
            for k in ("init_lambda", "lr", "optimizer", "batch_size", "batch_reduce", "use_grad_accumulate", "seed")
        }
        return {**meta, "kind": "wemoe_train_state", **training}

    def _build(self, modelpool: BaseModelPool, names: list[str], meta: Mapping[str, Any]) -> WEMoECLIPVisionModel:
        """Frozen task arithmetic (streamed per tensor), then the MLPs upscaled with the experts' task vectors."""
        scaling = self.scaling_factor
        merged = frozen_task_arithmetic(modelpool, names, scaling, desc=f"{self.name}: task arithmetic base")
        experts = {
            i: self._experts(modelpool, names, i)
            for i in tqdm(meta["upscaled_layers"], desc=f"{self.name}: upscaling", leave=False, disable=None)
        }
        return upscale_clip_vision_model(
            merged,
            experts,
            router_depth=self.router_hidden_layers,
            init_lambda=self.init_lambda,
            shared_gate=self.shared_gate,
            batch_reduce=self.batch_reduce,
            seed=self.seed,
            meta=meta,
        )

    def _experts(self, modelpool: BaseModelPool, names: list[str], layer: int) -> MLPExperts:
        """Layer ``layer``'s pre-trained MLP tensors and the stacked (pruned) task vectors ``(T, ...)``."""
        base, vectors = {}, {}
        for key in MLP_KEYS:
            full = f"encoder.layers.{layer}.mlp.{key}"
            theta0 = modelpool.get_tensor(PRETRAINED, full)
            dtype = compute_dtype(theta0.dtype)
            taus = [
                prune_task_vector(modelpool.get_tensor(n, full).to(dtype) - theta0.to(dtype), self.tv_prune_ratio)
                for n in names
            ]
            base[key], vectors[key] = theta0, torch.stack(taus).to(theta0.dtype)  # (T, *shape)
        return MLPExperts(base, vectors)

    # ---- checkpoints ---------------------------------------------------------------------------
    def _load_routers_checkpoint(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        path = Path(self.checkpoint).expanduser()
        path = path / CHECKPOINT_FILE if path.is_dir() else path
        return load_checkpoint(path, expect=meta, what=f"{self.name}: checkpoint")

    def _load_train_state(self, meta: Mapping[str, Any]) -> dict[str, Any] | None:
        if self.train_state_path is None or not Path(self.train_state_path).is_file():
            return None
        try:
            return load_checkpoint(
                self.train_state_path, expect=self._train_meta(meta), what=f"{self.name}: train state"
            )
        except ConfigError as err:
            raise ConfigError(f"{err}; delete it to start over, or set method.train_state_path") from None

    def _save_train_state(self, step: int, model: WEMoECLIPVisionModel, optimizer: torch.optim.Optimizer) -> None:
        state = {
            "step": step,
            "routers": model.router_state_dict(),
            "optimizer": optimizer.state_dict(),
            "history": torch.tensor(self._history, dtype=torch.float64),
            "rng_state": rng_state(),
        }
        save_checkpoint(self.train_state_path, state, meta=self._train_meta(model.meta))

    def _after_step(self, step: int, model: WEMoECLIPVisionModel, optimizer: torch.optim.Optimizer) -> None:
        """Called after every step: the periodic resumable state."""
        periodic = self.save_interval and step % self.save_interval == 0 and step < self.max_steps
        if periodic and self.train_state_path is not None and self._is_global_zero():
            self._save_train_state(step, model, optimizer)

    # ---- training --------------------------------------------------------------------------------
    def _fabric(self) -> Any:
        if self.fabric is None:
            import lightning

            self.fabric = lightning.Fabric(accelerator="auto", devices=self.devices)
            self.fabric.launch()
        elif self.devices not in (1, self.fabric.world_size):
            log.warning(
                "%s: method.devices=%d ignored: the run's Fabric has %d device(s); set fabric.devices instead",
                self.name,
                self.devices,
                self.fabric.world_size,
            )
        return self.fabric

    def _is_global_zero(self) -> bool:
        return self.fabric is None or self.fabric.is_global_zero

    def _train(
        self,
        model: WEMoECLIPVisionModel,
        heads: CLIPTaskClassifiers,
        names: list[str],
        meta: Mapping[str, Any],
        resume: Mapping[str, Any] | None,
    ) -> None:
        """Entropy minimisation over the routers, from ``resume`` if given."""
        fabric = self._fabric()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.lr)
        module, optimizer = fabric.setup(model, optimizer)
        classifiers = {t: heads.classifier(module, t).to(fabric.device) for t in names}
        start = self._apply_resume(model, optimizer, resume)
        streams = heads.test_time_batches(
            names,
            batch_size=self.batch_size,
            seed=self.seed + 1000 * fabric.global_rank,
            num_workers=self.num_workers,
            start=start,
        )  # skips used batches
        dtype = next(model.parameters()).dtype
        model.train()
        began = time.perf_counter()
        for step in tqdm(
            range(start, self.max_steps), initial=start, total=self.max_steps, desc=self.name, disable=None
        ):
            entropies = entropy_minimisation_step(
                classifiers,
                streams,
                optimizer,
                use_grad_accumulate=self.use_grad_accumulate,
                backward=fabric.backward,
                device=fabric.device,
                dtype=dtype,
            )
            self._history.append(sum(entropies.values()))
            fabric.log_dict(
                {"entropy/total": self._history[-1], **{f"entropy/{t}": v for t, v in entropies.items()}}, step=step + 1
            )
            self._after_step(step + 1, model, optimizer)
        model.eval()
        self._finish(fabric, start, time.perf_counter() - began)

    def _apply_resume(self, model: WEMoECLIPVisionModel, optimizer: Any, resume: Mapping[str, Any] | None) -> int:
        if resume is None:
            return 0
        model.load_router_state_dict(resume["routers"], what=f"{self.name}: train state {self.train_state_path!r}")
        optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng_state"])
        self._history = resume["history"].tolist()
        log.info("%s: resumed from step %d of %s", self.name, resume["step"], self.train_state_path)
        return min(int(resume["step"]), self.max_steps)

    def _finish(self, fabric: Any, start: int, seconds: float) -> None:
        for logger in fabric.loggers:
            logger.save()
        if self.train_state_path is not None and self._is_global_zero():
            Path(self.train_state_path).unlink(missing_ok=True)  # the final routers supersede it
        steps = self.max_steps - start
        self._summary = {
            "resumed_from_step": start,
            "steps_run": steps,
            "seconds_per_step": seconds / steps if steps else None,
        }

    def extra_report(self) -> dict[str, Any]:
        """The checkpoint loaded, or: steps, seconds per step, the entropy objective (summed over tasks) at the start and end: the
        mean of the first and last 10 steps (of each half when there are fewer than 20)."""
        if self.checkpoint is not None:
            return {self.name: {"checkpoint": self.checkpoint, "trained": False}}
        report: dict[str, Any] = {
            "trained": True,
            "max_steps": self.max_steps,
            "save_checkpoint": self.save_checkpoint,
            **self._summary,
        }
        if self._history:
            window = max(1, min(10, len(self._history) // 2))
            report["entropy_first"] = sum(self._history[:window]) / window
            report["entropy_last"] = sum(self._history[-window:]) / window
        return {self.name: report}


def _with_defaults(init: Callable[..., None], **defaults: Any) -> inspect.Signature:
    """``init``'s signature with other defaults (the config loader checks options against it)."""
    sig = inspect.signature(init)
    return sig.replace(parameters=[p.replace(default=defaults.get(n, p.default)) for n, p in sig.parameters.items()])


SPARSE_DEFAULTS = {"tv_prune_ratio": 0.9, "shared_gate": True, "use_grad_accumulate": False}


@register_algorithm(SPARSE_NAME)
class SparseCLIPWeightEnsemblingMoEAlgorithm(CLIPWeightEnsemblingMoEAlgorithm):
    """The efficient WEMoE: the same options, defaults ``tv_prune_ratio=0.9`` (each MLP task vector
    keeps its largest ~10% entries), ``shared_gate=True`` (one router for all layers) and
    ``use_grad_accumulate=False`` (the reference's configuration)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**{**SPARSE_DEFAULTS, **options})

    __init__.__signature__ = _with_defaults(CLIPWeightEnsemblingMoEAlgorithm.__init__, **SPARSE_DEFAULTS)  # type: ignore[attr-defined]
