"""What the test-time merging methods share (AdaMerging, Concrete subspace).

They learn merging parameters (coefficients ``λ``, mask logits) by minimising the prediction
entropy of the merged model on unlabelled *test* batches: every step draws one batch per task
from that task's own seeded stream, sums the tasks' entropies (``mean_b −Σ_c p log(p + 1e-8)``
on the zero-shot logits) and takes one optimiser step. The merged model is a function of the
learned parameters (:mod:`fusion_bench.models.functional_merge`); gradients reach them in two
stages: each task's forward/backward accumulates ``∂H/∂θ`` on the merged tensors (so only one
task's activations are alive at a time), then one vector-Jacobian product carries it to ``λ``
and the mask. With several devices each rank draws its own batches and the gradients are
averaged (``batch_size`` is per device).

Resuming: every ``save_interval`` steps (and at the end of each phase) the learned tensors,
optimiser states, step, per-task batch count, objective history and RNG states are written
atomically to ``<dir>/<method>-<hash>.ckpt``; ``dir`` is ``checkpoint_dir`` or, by default,
``<fabric.loggers.root_dir>/<fabric.loggers.name>/checkpoints``. ``hash`` identifies the run:
method, the pool's model names, a content fingerprint of θ0 and the task vectors, another of the
heads (each task's head, the visual projection, the logit scale), the test sets' sizes and
fingerprints, the hyperparameters and the device count (not the step counts). A run whose checkpoint
exists resumes from it (``resume=false``: start over) and ends exactly where an uninterrupted
run would: the batch streams skip the used batches, and mask noise is seeded by the step.
A finished run's checkpoint makes a rerun skip the training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from fusion_bench.errors import IncompatibleModelsError
from fusion_bench.merge.streaming import check_finite, compute_dtype
from fusion_bench.method.task_vector.core import plan_pool
from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers, entropy_loss
from fusion_bench.method._options import check_bool, check_choice, check_int
from fusion_bench.method.base_algorithm import BaseAlgorithm
from fusion_bench.modelpool import PRETRAINED, BaseModelPool
from fusion_bench.models.functional_merge import (
    FunctionalMergedModel,
    TaskVectorStack,
    backward_into_merge,
    detached_leaves,
    merge_parameters,
    unload,
)
from fusion_bench.utils.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fusion_bench.utils.instantiate import to_container

__all__ = [
    "OPTIMIZERS",
    "Phase",
    "TestTimeAlgorithm",
    "load_task_vector_stack",
    "content_fingerprint",
    "derived_seed",
    "check_optimizer",
    "make_optimizer",
]

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
CHECKPOINT_FORMAT = "fusion_bench.test_time.v1"


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed mixing ``seed`` with ``keys`` (e.g. a purpose and a step)."""
    return int(np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint64)[0] >> np.uint64(1))


def check_optimizer(method: str, value: Any) -> str:
    """The ``optimizer`` option: one of :data:`OPTIMIZERS`."""
    return check_choice(method, "optimizer", value, OPTIMIZERS)


def make_optimizer(kind: str, params: Sequence[Tensor], lr: float) -> torch.optim.Optimizer:
    """``"adam"`` (PyTorch defaults besides ``lr``) or plain ``"sgd"`` over ``params``."""
    return torch.optim.Adam(params, lr=lr) if kind == "adam" else torch.optim.SGD(params, lr=lr)


def load_task_vector_stack(modelpool: BaseModelPool, skeleton: nn.Module, *, what: str) -> TaskVectorStack:
    """``θ0`` (the skeleton's own parameters, shared) and every fine-tuned model's task vectors.

    The pool is validated first (same keys, shapes and dtypes; no NaN/Inf); the fine-tuned
    tensors are read one at a time. The skeleton is cast to the compute dtype (float32 at least).

    Raises:
        ModelPoolError: no ``_pretrained_`` model or no fine-tuned model.
        IncompatibleModelsError: the models differ, or a parameter has no tensor in the pool.
    """
    plan = plan_pool(modelpool, min_models=1)
    dtype = compute_dtype(next(skeleton.parameters()).dtype)
    skeleton.to(dtype)
    by_storage = {t.data_ptr(): key for key, t in modelpool.canonical_state_dict(skeleton).items()}
    base, vectors, names = {}, {}, []
    for pname, param in tqdm(
        list(skeleton.named_parameters()), desc=f"{what}: task vectors", leave=False, disable=None
    ):
        key = by_storage.get(param.data_ptr())
        if key is None or key not in plan.keys:
            raise IncompatibleModelsError(
                f"{what}: parameter {pname!r} of the {PRETRAINED!r} model has no tensor in the pool"
            )
        base[pname] = param.detach()
        tensors = []
        for model in plan.names:
            theta = modelpool.get_tensor(model, key)
            check_finite(model, key, theta)
            tensors.append(theta.to(device=param.device, dtype=dtype) - base[pname])
        vectors[pname] = torch.stack(tensors)  # (T, *shape)
        names.append(pname)
    return TaskVectorStack(tuple(plan.names), tuple(names), base, vectors)


@torch.no_grad()
def content_fingerprint(stack: TaskVectorStack) -> str:
    """A hash of the stack's names, shapes and per-tensor sums (what a resumed run must match)."""
    stats = torch.stack(
        [
            torch.stack(
                [
                    stack.base[n].double().sum(),
                    stack.vectors[n].double().sum(),
                    stack.vectors[n].double().square().sum(),
                ]
            )
            for n in stack.names
        ]
    )
    h = hashlib.blake2b(stack.fingerprint().encode(), digest_size=12)
    h.update(np.ascontiguousarray(stats.cpu().numpy()).tobytes())
    return h.hexdigest()


@dataclass
class Phase:
    """One stage of test-time training.

    Attributes:
        name: the log prefix (``"adamerging"``, ``"mask"``).
        steps: its number of optimisation steps.
        step: ``(step in phase, global step) -> metrics`` (``"loss"``: the summed entropy).
    """

    name: str
    steps: int
    step: Callable[[int, int], dict[str, float]]


class TestTimeAlgorithm(BaseAlgorithm):
    """The options and machinery of a test-time method (see module docstring).

    Args:
        batch_size: test images per task per step (per device).
        num_workers: DataLoader workers.
        seed: seeds the batch streams and the mask noise.
        save_interval: checkpoint every this many steps (and at the end of each phase).
        checkpoint_dir: where resumable checkpoints go (None: under the Fabric logger's folder,
            or nowhere without a logger).
        resume: resume from this run's checkpoint when there is one.
        devices: the number of devices; the program builds its Fabric with it (None: ``fabric.devices``).
        clip_model: the CLIP giving text tower, projection and logit scale (None: ``_pretrained_``).
        task_text: ``{task: {classnames, templates}}`` for the zero-shot heads (None: the built-in
            lists of the eight CLIP tasks and the mini benchmark).
    """

    name: ClassVar[str] = "test_time"

    def __init__(
        self,
        *,
        batch_size: int,
        num_workers: int,
        seed: int,
        save_interval: int,
        checkpoint_dir: str | None,
        resume: bool,
        devices: int | None,
        clip_model: Any,
        task_text: Any = None,
    ) -> None:
        n = self.name
        self.batch_size = check_int(n, "batch_size", batch_size, low=1)
        self.num_workers = check_int(n, "num_workers", num_workers, low=0)
        self.seed = check_int(n, "seed", seed, low=0)
        self.save_interval = check_int(n, "save_interval", save_interval, low=1)
        self.checkpoint_dir = checkpoint_dir or None
        self.resume = check_bool(n, "resume", resume)
        self.devices = None if devices is None else check_int(n, "devices", devices, low=1)
        self.clip_model = to_container(clip_model)
        self.task_text = to_container(task_text)
        self.history: dict[str, list[float]] = {}  # the objective of every step, per phase
        self.step_seconds: list[float] = []
        self.resumed_at: int | None = None

    # ---- setup ------------------------------------------------------------------------------
    def setup_fabric(self) -> Any:
        """The program's Fabric, else a one-CPU one (the method used on its own)."""
        if self.fabric is None:
            import lightning

            self.fabric = lightning.Fabric(accelerator="cpu", devices=1)
        return self.fabric

    def setup_task_vectors(self, modelpool: BaseModelPool) -> tuple[nn.Module, TaskVectorStack]:
        """The ``_pretrained_`` skeleton and the task vector stack, on the Fabric's device."""
        fabric = self.setup_fabric()
        skeleton = modelpool.load_pretrained_model()
        self.model_dtype = next(skeleton.parameters()).dtype
        skeleton.to(fabric.device)
        stack = load_task_vector_stack(modelpool, skeleton, what=self.name)
        return skeleton, stack.to(fabric.device)

    def setup_test_time(self, modelpool: BaseModelPool, skeleton: nn.Module, heads: CLIPTaskClassifiers) -> None:
        """Per-task classifiers around one :class:`FunctionalMergedModel` of ``skeleton``."""
        device = self.fabric.device
        self.tasks = list(modelpool.model_names)
        self.merged_model = FunctionalMergedModel(skeleton)
        self.classifiers = {t: heads.classifier(self.merged_model, t).to(device).eval() for t in self.tasks}
        self._heads = heads
        self._drawn = 0

    def check_test_datasets(self, modelpool: BaseModelPool) -> CLIPTaskClassifiers:
        """The heads helper, after checking every fine-tuned model has its task's test dataset."""
        heads = CLIPTaskClassifiers(modelpool, clip_model=self.clip_model, task_text=self.task_text, what=self.name)
        heads.check_tasks("test", modelpool.model_names)
        return heads

    # ---- the objective ---------------------------------------------------------------------
    def _next_pixels(self, task: str) -> Tensor:
        pixels, _ = next(self._streams[task])  # labels are never used
        return pixels.to(self.fabric.device)

    def entropy_backward(self, merged: Mapping[str, Tensor]) -> float:
        """Draw one batch per task, back-propagate the summed entropy into what ``merged`` depends on.

        Args:
            merged: the merged tensors, built with autograd tracking the learned parameters.

        Returns:
            the summed entropy (the objective) of this step.
        """
        leaves = detached_leaves(merged)
        self.merged_model.use(leaves)
        total = 0.0
        for task in self.tasks:
            pixels = self._next_pixels(task)
            with self.fabric.autocast():
                loss = entropy_loss(self.classifiers[task](pixels))
            loss.backward()
            total += loss.item()
        self._drawn += 1
        backward_into_merge(merged, leaves)  # ∂H/∂θ -> ∂H/∂λ, ∂H/∂mask
        self.merged_model.use(None)
        return total

    def average_gradients(self, tensors: Sequence[Tensor]) -> None:
        """Average the gradients of ``tensors`` over the Fabric's processes (no-op on one)."""
        if self.fabric.world_size == 1:
            return
        for t in tensors:
            if t.grad is not None:
                t.grad.copy_(self.fabric.all_reduce(t.grad, reduce_op="mean"))

    def entropy_objective(self, params: Sequence[Tensor]) -> Callable[[Mapping[str, Tensor]], float]:
        """``merged tensors -> summed entropy``: :meth:`entropy_backward`, then ``params``' gradients averaged.

        Args:
            params: the learned tensors the merge depends on (``λ``, mask logits).
        """

        def objective(merged: Mapping[str, Tensor]) -> float:
            value = self.entropy_backward(merged)
            self.average_gradients(params)
            return value

        return objective

    def merged_encoder(
        self,
        skeleton: nn.Module,
        stack: TaskVectorStack,
        coefficients: Tensor,
        mask: Mapping[str, Tensor] | None = None,
    ) -> nn.Module:
        """The final merge ``θ0 + Σ_t λ_t (m ⊙ τ_t)`` loaded into ``skeleton``, in the pool's dtype, on the CPU."""
        with torch.no_grad():
            merged = merge_parameters(stack, coefficients.to(self.fabric.device), mask)
        return unload(skeleton, merged, dtype=self.model_dtype).cpu()

    @torch.no_grad()
    def entropy_on(self, params: Mapping[str, Tensor], pixels: Mapping[str, Tensor]) -> float:
        """The summed entropy of the model with ``params`` on given ``{task: pixels}`` (no gradient)."""
        self.merged_model.use(params)
        total = sum(entropy_loss(self.classifiers[t](pixels[t].to(self.fabric.device))).item() for t in pixels)
        self.merged_model.use(None)
        return total

    # ---- resumable training ----------------------------------------------------------------
    def identity(self, stack: TaskVectorStack, modelpool: BaseModelPool) -> dict[str, Any]:
        """What a checkpoint of this run must match (its file name is a hash of it)."""
        datasets = {t: self._heads.dataset("test", t) for t in self.tasks}
        return {
            "format": CHECKPOINT_FORMAT,
            "method": self.name,
            "models": list(modelpool.model_names),
            "content": content_fingerprint(stack),
            "heads": self._heads.fingerprint(self.tasks),
            "test_sizes": {t: len(d) for t, d in datasets.items()},
            "test_data": {t: getattr(d, "_fingerprint", None) for t, d in datasets.items()},
            "options": self.trajectory_options(),
            "world_size": int(self.fabric.world_size),
        }

    def trajectory_options(self) -> dict[str, Any]:
        """The hyperparameters that change the training trajectory (subclasses extend)."""
        return {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "clip_model": repr(self.clip_model),
            "task_text": self.task_text,
        }

    def checkpoint_path(self, meta: Mapping[str, Any]) -> Path | None:
        """``<dir>/<method>-<hash>.ckpt`` (see module docstring); None: no checkpoints."""
        directory = self.checkpoint_dir
        if directory is None and self.fabric.loggers:
            logger = self.fabric.loggers[0]
            root, name = getattr(logger, "root_dir", None), getattr(logger, "name", None)
            directory = str(Path(root) / (name or "") / "checkpoints") if root is not None else None
        if directory is None:
            return None
        digest = hashlib.blake2b(json.dumps(meta, sort_keys=True).encode(), digest_size=8).hexdigest()
        return Path(directory).expanduser() / f"{self.name}-{digest}.ckpt"

    def train(self, phases: Sequence[Phase], state: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """Run ``phases`` in order, resuming from and writing checkpoints of ``state``.

        Args:
            phases: the stages; each step draws one batch per task per :meth:`entropy_backward`.
            state: ``{name: tensor or optimiser}``: everything learned (restored in place).
            meta: :meth:`identity` of the run.
        """
        path = self.checkpoint_path(meta)
        where = self._resume(path, phases, state, meta)
        self._streams = self._heads.test_time_batches(
            self.tasks,
            batch_size=self.batch_size,
            seed=self.seed + len(self.tasks) * self.fabric.global_rank,
            num_workers=self.num_workers,
            start=self._drawn,
        )
        global_step = sum(p.steps for p in phases[: where[0]]) + where[1]
        for index in range(where[0], len(phases)):
            phase = phases[index]
            first = where[1] if index == where[0] else 0
            bar = tqdm(
                range(first, phase.steps),
                initial=first,
                total=phase.steps,
                desc=f"{self.name} ({phase.name})",
                leave=False,
                disable=None,
            )
            for step in bar:
                start = time.perf_counter()
                metrics = phase.step(step, global_step)
                self.step_seconds.append(time.perf_counter() - start)
                self.history.setdefault(phase.name, []).append(metrics["loss"])
                self.fabric.log_dict({f"{phase.name}/{k}": v for k, v in metrics.items()}, step=global_step)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                global_step += 1
                if path is not None and ((step + 1) % self.save_interval == 0 or step + 1 == phase.steps):
                    self._save(path, phases, index, step + 1, state, meta)
        self._streams = {}  # stop the loaders (and their workers) before the evaluation
        for logger in self.fabric.loggers:
            logger.save()

    def _save(
        self,
        path: Path,
        phases: Sequence[Phase],
        index: int,
        step: int,
        state: Mapping[str, Any],
        meta: Mapping[str, Any],
    ) -> None:
        if not self.fabric.is_global_zero:
            return
        saved = {k: _saveable(v) for k, v in state.items()}
        save_checkpoint(
            path,
            {
                "phase": index,
                "step": step,
                "drawn": self._drawn,
                "phase_steps": [p.steps for p in phases],
                "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()},
                "rng": rng_state(),
                "state": saved,
            },
            meta=meta,
        )

    def _resume(
        self, path: Path | None, phases: Sequence[Phase], state: Mapping[str, Any], meta: Mapping[str, Any]
    ) -> tuple[int, int]:
        if path is None or not self.resume or not path.is_file():
            return 0, 0
        data = load_checkpoint(path, expect=meta, what=f"{self.name}: checkpoint")
        index, step, done = int(data["phase"]), int(data["step"]), list(data["phase_steps"])
        steps = [p.steps for p in phases]
        if done[:index] != steps[:index] or step > steps[index]:
            log.warning("%s: %s was made with step counts %s, not %s; starting over", self.name, path, done, steps)
            return 0, 0
        for key, value in state.items():
            _restore(value, data["state"][key])
        set_rng_state(data["rng"])
        self.history = {k: v.tolist() for k, v in data["history"].items()}
        self._drawn = int(data["drawn"])
        self.resumed_at = sum(steps[:index]) + step
        log.info("%s: resumed from %s at step %d", self.name, path, self.resumed_at)
        return index, step

    # ---- report ------------------------------------------------------------------------------
    def training_report(self) -> dict[str, Any]:
        """Steps, the objective per phase (means of its first and last 10 steps), seconds per step, resume point."""
        if not self.history:
            return {}
        objective = {
            name: {"first": sum(v[:10]) / len(v[:10]), "last": sum(v[-10:]) / len(v[-10:])}
            for name, v in self.history.items()
        }
        seconds = self.step_seconds
        return {
            "num_steps": sum(map(len, self.history.values())),
            "objective": objective,
            "seconds_per_step": sum(seconds) / len(seconds) if seconds else None,
            "resumed_at_step": self.resumed_at,
        }


def _saveable(value: Any) -> Any:
    """An optimiser's state dict, a tensor on the CPU, or a mapping of tensors on the CPU."""
    if hasattr(value, "state_dict"):
        return value.state_dict()
    if isinstance(value, Mapping):
        return {k: v.detach().cpu() for k, v in value.items()}
    return value.detach().cpu()


@torch.no_grad()
def _restore(value: Any, saved: Any) -> None:
    """Load ``saved`` into ``value`` in place (the inverse of :func:`_saveable`)."""
    if hasattr(value, "load_state_dict"):
        value.load_state_dict(saved)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            v.copy_(saved[k].to(v.device))
    else:
        value.copy_(saved.to(value.device))
