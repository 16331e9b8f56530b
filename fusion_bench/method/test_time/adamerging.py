"""AdaMerging: merging coefficients learned at test time by entropy minimisation.

Yang et al., *AdaMerging: Adaptive Model Merging for Multi-Task Learning*, ICLR 2024.
https://arxiv.org/abs/2310.02575

Task-wise: ``θ = θ0 + Σ_t λ_t τ_t`` with ``λ ∈ ℝ^T``; layer-wise: ``θ_k = θ0_k + Σ_t λ_{t,k} τ_{t,k}``
with one coefficient per task and parameter tensor (``λ ∈ ℝ^{T×L}``). ``λ`` starts at task
arithmetic's scaling factor and is trained by Adam on the summed prediction entropy of one
shuffled unlabelled test batch per task per step (:mod:`fusion_bench.method.test_time.base`).

Reference defaults (the published tables; docs/algorithms.md): ``init_values`` 0.3, unclamped, Adam lr 1e-3, batch 16,
1000 steps. The paper's own code clamps ``λ`` to [0, 1]: ``clamp_weights=true``.
``save_merging_weights=PATH`` writes the learned (clamped, if so) coefficients with the pool's
model names, the variant and the model's tensor layout; ``weights=PATH`` loads such a file
(refusing one made for another pool, variant or architecture) and skips the training.
Task-wise ``weights`` may also be a list of ``T`` numbers.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor, nn

from fusion_bench.errors import ConfigError
from fusion_bench.method._options import check_bool, check_int, check_range
from fusion_bench.method.test_time.base import Phase, TestTimeAlgorithm, check_optimizer, make_optimizer
from fusion_bench.method.base_algorithm import register_algorithm
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.models.functional_merge import TaskVectorStack, merge_parameters
from fusion_bench.utils.checkpoint import load_checkpoint, save_checkpoint
from fusion_bench.utils.instantiate import to_container

__all__ = [
    "adamerging_step",
    "save_merging_weights",
    "load_merging_weights",
    "finish_coefficients",
    "CLIPTaskWiseAdaMergingAlgorithm",
    "CLIPLayerWiseAdaMergingAlgorithm",
]

WEIGHTS_FORMAT = "fusion_bench.merging_weights.v1"
CLAMP = (0.0, 1.0)


def adamerging_step(
    stack: TaskVectorStack,
    coefficients: Tensor,
    optimizer: torch.optim.Optimizer,
    objective: Callable[[Mapping[str, Tensor]], float],
    *,
    clamp: tuple[float, float] | None,
    mask: Mapping[str, Tensor] | None = None,
) -> float:
    """One AdaMerging step (the core): merge with ``λ``, back-propagate the objective, step.

    Args:
        stack: ``θ0`` and the task vectors.
        coefficients: ``λ``, ``(T,)`` or ``(T, L)``, a trainable leaf.
        optimizer: over ``[coefficients]``.
        objective: ``merged tensors -> value``; back-propagates into the merged tensors' inputs.
        clamp: bounds of ``λ`` in the merge (None: unclamped).
        mask: a fixed mask of the task vectors (Concrete AdaMerging), or None.

    Returns:
        the objective's value.
    """
    optimizer.zero_grad(set_to_none=True)
    value = objective(merge_parameters(stack, coefficients, mask, clamp=clamp))
    optimizer.step()
    return value


def _meta(method: str, models: Any) -> dict[str, Any]:
    return {"format": WEIGHTS_FORMAT, "method": method, "models": list(models)}


def save_merging_weights(path: str, coefficients: Tensor, stack: TaskVectorStack, *, method: str) -> None:
    """Write ``coefficients`` (``(T,)`` or ``(T, L)``) for ``stack``'s pool and layout, atomically."""
    meta = {**_meta(method, stack.models), "tensors": stack.fingerprint()}
    save_checkpoint(
        path, {"merging_weights": coefficients.detach().cpu(), "parameter_names": list(stack.names)}, meta=meta
    )


def load_merging_weights(path: str, *, method: str, models: Any) -> dict[str, Any]:
    """Read a :func:`save_merging_weights` file made by ``method`` for the pool's ``models``.

    Raises:
        ModelLoadError: no such file, or not a FusionBench checkpoint.
        ConfigError: made for another variant or other models (naming them).
    """
    return load_checkpoint(path, expect=_meta(method, models), what=f"{method}: weights")


def finish_coefficients(
    method: TestTimeAlgorithm,
    coefficients: Tensor,
    stack: TaskVectorStack,
    *,
    clamp: tuple[float, float] | None,
    save_path: str | None,
) -> Tensor:
    """The coefficients the merge uses (clamped, if so) on the CPU, written to ``save_path`` if given."""
    effective = (coefficients if clamp is None else coefficients.clamp(*clamp)).detach().cpu()
    if save_path is not None and method.fabric.is_global_zero:
        save_merging_weights(save_path, effective, stack, method=method.name)
    return effective


class _AdaMerging(TestTimeAlgorithm):
    """AdaMerging for CLIP vision encoders (one of the two registered variants below).

    Args:
        weights: a :func:`save_merging_weights` file, or (task-wise) a list of ``T`` numbers:
            merge with them and skip the training. None: learn them.
        init_values: the initial ``λ`` (task arithmetic's scaling factor).
        clamp_weights: clamp ``λ`` to [0, 1] in the merge (the paper's code); false: unclamped (reference).
        optimizer: ``"adam"`` or ``"sgd"``.
        lr: the learning rate.
        max_steps: optimisation steps.
        save_merging_weights: where to write the coefficients (None: not written).
        batch_size, num_workers, seed, save_interval, checkpoint_dir, resume, devices, clip_model, task_text:
            see :class:`~fusion_bench.method.test_time.base.TestTimeAlgorithm`.
    """

    layer_wise: ClassVar[bool]

    def __init__(
        self,
        *,
        weights: Any = None,
        init_values: float = 0.3,
        clamp_weights: bool = False,
        optimizer: str = "adam",
        lr: float = 1e-3,
        max_steps: int = 1000,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 42,
        save_merging_weights: str | None = None,
        save_interval: int = 100,
        checkpoint_dir: str | None = None,
        resume: bool = True,
        devices: int | None = None,
        clip_model: Any = None,
        task_text: Any = None,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
            save_interval=save_interval,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            devices=devices,
            clip_model=clip_model,
            task_text=task_text,
        )
        n = self.name
        self.weights = to_container(weights) or None
        if self.weights is not None and not isinstance(self.weights, (str, list)):
            raise ConfigError(f"{n}: option 'weights' must be a file path or a list of numbers; got {weights!r}")
        self.init_values = check_range(n, "init_values", init_values)
        self.clamp_weights = check_bool(n, "clamp_weights", clamp_weights)
        self.optimizer = check_optimizer(n, optimizer)
        self.lr = check_range(n, "lr", lr, low=0.0, low_open=True)
        self.max_steps = check_int(n, "max_steps", max_steps, low=1)
        self.save_merging_weights = save_merging_weights or None
        self.merging_weights: Tensor | None = None

    def trajectory_options(self) -> dict[str, Any]:
        return {
            **super().trajectory_options(),
            "init_values": self.init_values,
            "clamp_weights": self.clamp_weights,
            "optimizer": self.optimizer,
            "lr": self.lr,
        }

    @property
    def clamp(self) -> tuple[float, float] | None:
        return CLAMP if self.clamp_weights else None

    def _shape(self, stack: TaskVectorStack) -> tuple[int, ...]:
        return (stack.num_tasks, stack.num_tensors) if self.layer_wise else (stack.num_tasks,)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """Learn (or load) ``λ``, save it if asked, and return the merged CLIP vision encoder."""
        saved = self._read_weights(modelpool)
        heads = self.check_test_datasets(modelpool) if saved is None else None
        skeleton, stack = self.setup_task_vectors(modelpool)
        if saved is not None:
            coefficients = self._check_weights(saved, stack).to(self.fabric.device)
        else:
            self.setup_test_time(modelpool, skeleton, heads)
            coefficients = self._learn(stack, modelpool)
        self.merging_weights = finish_coefficients(
            self, coefficients, stack, clamp=self.clamp, save_path=self.save_merging_weights
        )
        self.model_names = list(stack.models)
        return self.merged_encoder(skeleton, stack, self.merging_weights)

    def _learn(self, stack: TaskVectorStack, modelpool: BaseModelPool) -> Tensor:
        lam = torch.full(self._shape(stack), self.init_values, device=self.fabric.device, requires_grad=True)
        optimizer = make_optimizer(self.optimizer, [lam], self.lr)
        objective = self.entropy_objective([lam])

        def step(step: int, global_step: int) -> dict[str, float]:
            return {"loss": adamerging_step(stack, lam, optimizer, objective, clamp=self.clamp)}

        self.train(
            [Phase("adamerging", self.max_steps, step)],
            {"coefficients": lam, "optimizer": optimizer},
            self.identity(stack, modelpool),
        )
        return lam.detach()

    # ---- weights= ---------------------------------------------------------------------------
    def _read_weights(self, modelpool: BaseModelPool) -> Any:
        """The ``weights`` option read and checked against the pool (before any model is loaded)."""
        if self.weights is None:
            return None
        if isinstance(self.weights, list):
            if self.layer_wise:
                raise ConfigError(
                    f"{self.name}: option 'weights' must be a file for layer-wise coefficients; got a list"
                )
            return torch.tensor([check_range(self.name, f"weights[{i}]", v) for i, v in enumerate(self.weights)])
        return load_merging_weights(self.weights, method=self.name, models=modelpool.model_names)

    def _check_weights(self, saved: Any, stack: TaskVectorStack) -> Tensor:
        if isinstance(saved, Tensor):
            if tuple(saved.shape) != self._shape(stack):
                raise ConfigError(
                    f"{self.name}: option 'weights' has {saved.numel()} numbers; the pool has "
                    f"{stack.num_tasks} models {list(stack.models)}"
                )
            return saved.float()
        if saved["meta"].get("tensors") != stack.fingerprint():
            raise ConfigError(
                f"{self.name}: weights {self.weights!r} were made for another model architecture "
                f"(its parameters differ from the pool's {stack.num_tensors} tensors)"
            )
        return saved["merging_weights"].float()

    def extra_report(self) -> dict[str, Any]:
        """The learned coefficients (layer-wise: their mean per model) and the training summary."""
        if self.merging_weights is None:
            return {}
        w = self.merging_weights
        per_model = w.mean(dim=1) if w.dim() == 2 else w
        key = "merging_weights_mean" if w.dim() == 2 else "merging_weights"
        report = {key: {m: float(v) for m, v in zip(self.model_names, per_model)}, **self.training_report()}
        if self.weights is not None:
            report["weights"] = self.weights if isinstance(self.weights, str) else "inline"
        return {self.name: report}


@register_algorithm("clip_task_wise_adamerging")
class CLIPTaskWiseAdaMergingAlgorithm(_AdaMerging):
    __doc__ = "Task-wise AdaMerging (``λ ∈ ℝ^T``).\n\n" + (_AdaMerging.__doc__ or "")
    layer_wise = False


@register_algorithm("clip_layer_wise_adamerging")
class CLIPLayerWiseAdaMergingAlgorithm(_AdaMerging):
    __doc__ = "Layer-wise AdaMerging (``λ ∈ ℝ^{T×L}``, one per parameter tensor).\n\n" + (_AdaMerging.__doc__ or "")
    layer_wise = True
