"""Concrete subspace learning: a shared Concrete mask over the task vectors, meta-learned at test time.

Tang et al., *Concrete Subspace Learning based Interference Elimination for Multi-task Model
Fusion*, 2023. https://arxiv.org/abs/2312.06173

One mask-logit tensor per parameter, shared by all tasks, initialised at ``initial_logits`` (0);
each step draws ``m ~ RelaxedBernoulli(temperature, logits)`` (seeded by the step), rescales it
per tensor to ``m / mean(m)`` and merges with the masked task vectors; the mask logits are
trained by Adam on the summed test-time entropy (:mod:`fusion_bench.method.test_time.base`).

* **Concrete task arithmetic** (``clip_concrete_task_arithmetic``): ``θ = θ0 + λ Σ_t (m ⊙ τ_t)``
  with fixed ``λ`` = 0.3; Adam lr 1e-3 on the logits, 2000 steps.
* **Concrete layer-wise AdaMerging** (``clip_concrete_layer_wise_adamerging``): bi-level. Each
  step, the inner problem: one step of its own Adam (lr ``base_lr`` = 1) on layer-wise ``λ``,
  taken from ``λ0`` = ``scaling_factor``, on the entropy with this step's mask held fixed; the
  outer problem: the entropy of the merge with the updated ``λ`` (held fixed) and the same mask,
  back-propagated to the logits (first order, as the reference does). Then layer-wise
  AdaMerging with the final mask (``λ`` reset to ``λ0`` before it, whatever its length; Adam
  ``adamerging_lr``, ``max_adamerging_steps``).
  ``inner_lambda`` picks where the inner gradient is evaluated: ``carry`` (default, the
  reference's order) merges with the ``λ`` carried from the previous inner step, then resets
  ``λ`` to ``λ0`` and steps from there with that gradient; ``reset`` resets first and takes the
  gradient at ``λ0`` (the bi-level step as written). Both agree at the first step.

The final mask (``eval_mask_type``): ``continuous``, a relaxed draw as the reference does (here
seeded); ``discrete``, a seeded hard Bernoulli draw; ``threshold``, the deterministic mask keeping
entries whose keep probability is at least 0.5. ``save_mask=PATH`` writes the learned logits
(with the pool's model names and tensor layout); ``mask_checkpoint=PATH`` loads them and skips
the mask training.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from fusion_bench.errors import ConfigError
from fusion_bench.method._options import check_bool, check_choice, check_int, check_range
from fusion_bench.method.test_time.base import Phase, TestTimeAlgorithm, check_optimizer, derived_seed, make_optimizer
from fusion_bench.method.test_time.adamerging import CLAMP, adamerging_step, finish_coefficients
from fusion_bench.method.base_algorithm import register_algorithm
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.models.concrete_mask import (
    MASK_KINDS,
    final_mask,
    init_mask_logits,
    mask_density,
    rescale_mask,
    sample_concrete_mask,
)
from fusion_bench.models.functional_merge import TaskVectorStack, merge_parameters
from fusion_bench.utils.checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "concrete_mask_step",
    "INNER_LAMBDA",
    "ConcreteTaskArithmeticAlgorithm",
    "ConcreteLayerWiseAdaMergingAlgorithm",
]

MASK_FORMAT = "fusion_bench.concrete_mask.v1"
TRAIN_NOISE, FINAL_NOISE = 0, 1  # purposes of the mask noise seeds
INNER_LAMBDA = ("carry", "reset")  # where the inner step's gradient is taken (see module docstring)


def concrete_mask_step(
    stack: TaskVectorStack,
    coefficients: Tensor,
    logits: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    objective: Any,
    *,
    temperature: float,
    generator: torch.Generator,
) -> tuple[float, float]:
    """One step on the mask logits (the core): draw, rescale, merge, back-propagate, step.

    Args:
        stack: ``θ0`` and the task vectors.
        coefficients: ``λ`` (held fixed here).
        logits: ``{name: mask logits}`` (trainable leaves).
        optimizer: over the logits.
        objective: ``merged tensors -> value``; back-propagates into the logits.
        temperature: the Concrete temperature.
        generator: the noise of this step's draw.

    Returns:
        the objective and the drawn mask's density (mean value before rescaling).
    """
    optimizer.zero_grad(set_to_none=True)
    mask = sample_concrete_mask(logits, temperature, generator)
    density = mask_density(mask.values())
    value = objective(merge_parameters(stack, coefficients.detach(), rescale_mask(mask)))
    optimizer.step()
    return value, density


class _ConcreteBase(TestTimeAlgorithm):
    """Options and mask handling shared by both Concrete methods (see module docstring)."""

    def _init_mask_options(
        self,
        *,
        temperature: float,
        initial_logits: float,
        eval_mask_type: str,
        optimizer: str,
        lr: float,
        max_steps: int,
        mask_checkpoint: str | None,
        save_mask: str | None,
    ) -> None:
        n = self.name
        self.temperature = check_range(n, "temperature", temperature, low=0.0, low_open=True)
        self.initial_logits = check_range(n, "initial_logits", initial_logits)
        self.eval_mask_type = check_choice(n, "eval_mask_type", eval_mask_type, MASK_KINDS)
        self.optimizer = check_optimizer(n, optimizer)
        self.lr = check_range(n, "lr", lr, low=0.0, low_open=True)
        self.max_steps = check_int(n, "max_steps", max_steps, low=1)
        self.mask_checkpoint = mask_checkpoint or None
        self.save_mask = save_mask or None
        self.density: float | None = None

    def trajectory_options(self) -> dict[str, Any]:
        return {
            **super().trajectory_options(),
            "temperature": self.temperature,
            "initial_logits": self.initial_logits,
            "optimizer": self.optimizer,
            "lr": self.lr,
            "mask_checkpoint": self.mask_checkpoint,
        }

    def _generator(self, *keys: int) -> torch.Generator:
        return torch.Generator(device=self.fabric.device).manual_seed(derived_seed(self.seed, *keys))

    def _mask_logits(self, modelpool: BaseModelPool, stack: TaskVectorStack) -> dict[str, Tensor]:
        logits = init_mask_logits(
            {n: stack.base[n].shape for n in stack.names}, self.initial_logits, device=self.fabric.device
        )
        if self.mask_checkpoint is not None:
            saved = load_checkpoint(
                self.mask_checkpoint,
                expect={"format": MASK_FORMAT, "models": list(modelpool.model_names)},
                what=f"{self.name}: mask_checkpoint",
            )
            if saved["meta"].get("tensors") != stack.fingerprint():
                raise ConfigError(
                    f"{self.name}: mask_checkpoint {self.mask_checkpoint!r} was made for another model architecture"
                )
            with torch.no_grad():
                for name, t in logits.items():
                    t.copy_(saved["mask_logits"][name].to(t.device))
        return logits

    def _final_mask(self, logits: Mapping[str, Tensor], stack: TaskVectorStack) -> dict[str, Tensor]:
        if self.save_mask is not None and self.fabric.is_global_zero:
            meta = {
                "format": MASK_FORMAT,
                "method": self.name,
                "models": self.model_names,
                "tensors": stack.fingerprint(),
            }
            save_checkpoint(
                self.save_mask, {"mask_logits": {k: v.detach().cpu() for k, v in logits.items()}}, meta=meta
            )
        mask = final_mask(
            logits, self.eval_mask_type, temperature=self.temperature, generator=self._generator(FINAL_NOISE)
        )
        self.density = mask_density(mask.values())
        return rescale_mask(mask)

    def _report(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        if self.density is None:
            return {}
        return {
            self.name: {
                "eval_mask_type": self.eval_mask_type,
                "mask_density": self.density,
                **extra,
                **self.training_report(),
            }
        }


@register_algorithm("clip_concrete_task_arithmetic")
class ConcreteTaskArithmeticAlgorithm(_ConcreteBase):
    """Concrete task arithmetic: ``θ0 + λ Σ_t (m ⊙ τ_t)``, the shared mask learned at test time.

    Args:
        scaling_factor: ``λ`` (fixed).
        temperature: the Concrete temperature.
        initial_logits: the mask logits' initial value.
        eval_mask_type: the final mask: ``continuous`` | ``discrete`` | ``threshold``.
        optimizer: ``"adam"`` or ``"sgd"`` (on the mask logits).
        lr: its learning rate.
        max_steps: mask training steps.
        mask_checkpoint: a ``save_mask`` file: use its logits, skip the training.
        save_mask: where to write the learned mask logits.
        batch_size, num_workers, seed, save_interval, checkpoint_dir, resume, devices, clip_model, task_text:
            see :class:`~fusion_bench.method.test_time.base.TestTimeAlgorithm`.
    """

    def __init__(
        self,
        *,
        scaling_factor: float = 0.3,
        temperature: float = 0.5,
        initial_logits: float = 0.0,
        eval_mask_type: str = "continuous",
        optimizer: str = "adam",
        lr: float = 1e-3,
        max_steps: int = 2000,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 42,
        mask_checkpoint: str | None = None,
        save_mask: str | None = None,
        save_interval: int = 500,
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
        self.scaling_factor = check_range(self.name, "scaling_factor", scaling_factor)
        self._init_mask_options(
            temperature=temperature,
            initial_logits=initial_logits,
            eval_mask_type=eval_mask_type,
            optimizer=optimizer,
            lr=lr,
            max_steps=max_steps,
            mask_checkpoint=mask_checkpoint,
            save_mask=save_mask,
        )

    def trajectory_options(self) -> dict[str, Any]:
        return {**super().trajectory_options(), "scaling_factor": self.scaling_factor}

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """Learn (or load) the mask and return ``θ0 + λ Σ_t (m ⊙ τ_t)`` with the final mask."""
        self.model_names = list(modelpool.model_names)
        heads = self.check_test_datasets(modelpool) if self.mask_checkpoint is None else None
        skeleton, stack = self.setup_task_vectors(modelpool)
        stack = stack.summed()  # λ is shared: Σ_t τ_t is all the merge needs (one model's worth)
        lam = torch.full((1,), self.scaling_factor, device=self.fabric.device)
        logits = self._mask_logits(modelpool, stack)
        if self.mask_checkpoint is None:
            self.setup_test_time(modelpool, skeleton, heads)
            optimizer = make_optimizer(self.optimizer, list(logits.values()), self.lr)
            objective = self.entropy_objective(list(logits.values()))

            def step(step: int, global_step: int) -> dict[str, float]:
                value, density = concrete_mask_step(
                    stack,
                    lam,
                    logits,
                    optimizer,
                    objective,
                    temperature=self.temperature,
                    generator=self._generator(TRAIN_NOISE, global_step),
                )
                return {"loss": value, "mask_density": density}

            self.train(
                [Phase("mask", self.max_steps, step)],
                {"mask_logits": logits, "optimizer": optimizer},
                self.identity(stack, modelpool),
            )
        return self.merged_encoder(skeleton, stack, lam, self._final_mask(logits, stack))

    def extra_report(self) -> dict[str, Any]:
        return self._report({"scaling_factor": self.scaling_factor})


@register_algorithm("clip_concrete_layer_wise_adamerging")
class ConcreteLayerWiseAdaMergingAlgorithm(_ConcreteBase):
    """Concrete layer-wise AdaMerging: a bi-level meta-learned shared mask, then layer-wise AdaMerging.

    Args:
        scaling_factor: the initial layer-wise ``λ`` (of the inner problem and of the AdaMerging phase).
        base_lr: the inner problem's Adam learning rate on ``λ``.
        inner_lambda: ``"carry"`` (the inner gradient at the carried ``λ``, then reset and step; the
            reference's order) or ``"reset"`` (reset to ``λ0`` first, gradient there).
        adamerging_lr: the AdaMerging phase's learning rate.
        max_adamerging_steps: AdaMerging steps with the final mask.
        clamp_weights: clamp ``λ`` to [0, 1] in the merge.
        save_merging_weights: where to write the final ``λ`` (the AdaMerging file format).
        temperature, initial_logits, eval_mask_type, optimizer, lr, max_steps, mask_checkpoint,
            save_mask: as :class:`ConcreteTaskArithmeticAlgorithm` (``lr`` and ``max_steps``: the mask's).
        batch_size, num_workers, seed, save_interval, checkpoint_dir, resume, devices, clip_model, task_text:
            see :class:`~fusion_bench.method.test_time.base.TestTimeAlgorithm`.
    """

    def __init__(
        self,
        *,
        scaling_factor: float = 0.3,
        base_lr: float = 1.0,
        inner_lambda: str = "carry",
        adamerging_lr: float = 1e-3,
        max_adamerging_steps: int = 1000,
        clamp_weights: bool = False,
        temperature: float = 0.5,
        initial_logits: float = 0.0,
        eval_mask_type: str = "continuous",
        optimizer: str = "adam",
        lr: float = 1e-3,
        max_steps: int = 1000,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 42,
        mask_checkpoint: str | None = None,
        save_mask: str | None = None,
        save_merging_weights: str | None = None,
        save_interval: int = 500,
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
        self.scaling_factor = check_range(n, "scaling_factor", scaling_factor)
        self.base_lr = check_range(n, "base_lr", base_lr, low=0.0, low_open=True)
        self.inner_lambda = check_choice(n, "inner_lambda", inner_lambda, INNER_LAMBDA)
        self.adamerging_lr = check_range(n, "adamerging_lr", adamerging_lr, low=0.0, low_open=True)
        self.max_adamerging_steps = check_int(n, "max_adamerging_steps", max_adamerging_steps, low=0)
        self.clamp_weights = check_bool(n, "clamp_weights", clamp_weights)
        self.save_merging_weights = save_merging_weights or None
        self._init_mask_options(
            temperature=temperature,
            initial_logits=initial_logits,
            eval_mask_type=eval_mask_type,
            optimizer=optimizer,
            lr=lr,
            max_steps=max_steps,
            mask_checkpoint=mask_checkpoint,
            save_mask=save_mask,
        )
        self.merging_weights: Tensor | None = None

    def trajectory_options(self) -> dict[str, Any]:
        return {
            **super().trajectory_options(),
            "scaling_factor": self.scaling_factor,
            "base_lr": self.base_lr,
            "inner_lambda": self.inner_lambda,
            "adamerging_lr": self.adamerging_lr,
            "clamp_weights": self.clamp_weights,
            "eval_mask_type": self.eval_mask_type,
        }

    @property
    def clamp(self) -> tuple[float, float] | None:
        return CLAMP if self.clamp_weights else None

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """Meta-learn (or load) the mask, run AdaMerging with it, return the merged encoder."""
        self.model_names = list(modelpool.model_names)
        heads = self.check_test_datasets(modelpool)
        skeleton, stack = self.setup_task_vectors(modelpool)
        self.setup_test_time(modelpool, skeleton, heads)
        bilevel = _BiLevel(self, stack, self._mask_logits(modelpool, stack))
        phases = [
            Phase("mask", 0 if self.mask_checkpoint else self.max_steps, bilevel.mask_step),
            Phase("adamerging", self.max_adamerging_steps, bilevel.adamerging_step),
        ]
        self.train(phases, bilevel.state(), self.identity(stack, modelpool))
        if self.max_adamerging_steps == 0:
            bilevel.reset_lambda()  # the (empty) AdaMerging phase starts from λ0 too
        mask = bilevel.final_mask()
        self.merging_weights = finish_coefficients(
            self, bilevel.lam, stack, clamp=self.clamp, save_path=self.save_merging_weights
        )
        return self.merged_encoder(skeleton, stack, self.merging_weights, mask)

    def extra_report(self) -> dict[str, Any]:
        extra = {}
        if self.merging_weights is not None:
            extra["merging_weights_mean"] = {
                m: float(v) for m, v in zip(self.model_names, self.merging_weights.mean(dim=1))
            }
        return self._report(extra)


class _BiLevel:
    """The learned state and the two kinds of steps of Concrete layer-wise AdaMerging (see module docstring)."""

    def __init__(
        self, method: ConcreteLayerWiseAdaMergingAlgorithm, stack: TaskVectorStack, logits: dict[str, Tensor]
    ) -> None:
        m = self.method = method
        self.stack, self.logits = stack, logits
        self.init = torch.full((stack.num_tasks, stack.num_tensors), m.scaling_factor, device=m.fabric.device)
        self.lam = self.init.clone().requires_grad_(True)
        self.mask_opt = make_optimizer(m.optimizer, list(logits.values()), m.lr)
        self.inner_opt = make_optimizer(m.optimizer, [self.lam], m.base_lr)
        self.ada_opt = make_optimizer(m.optimizer, [self.lam], m.adamerging_lr)
        self.mask_objective = m.entropy_objective(list(logits.values()))
        self.lam_objective = m.entropy_objective([self.lam])
        self._final: dict[str, Tensor] = {}

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds."""
        return {
            "mask_logits": self.logits,
            "coefficients": self.lam,
            "mask_optimizer": self.mask_opt,
            "inner_optimizer": self.inner_opt,
            "adamerging_optimizer": self.ada_opt,
        }

    def reset_lambda(self) -> None:
        """``λ ← λ0`` (in place; the optimisers keep their state)."""
        with torch.no_grad():
            self.lam.copy_(self.init)

    def inner_step(self, mask: Mapping[str, Tensor]) -> float:
        """One inner step on λ with ``mask`` fixed, ending at ``λ0`` minus the optimiser's step.

        ``carry``: the gradient at the current (carried) λ, then the reset; ``reset``: the reset,
        then the gradient at ``λ0``. Returns the inner objective.
        """
        m = self.method
        self.inner_opt.zero_grad(set_to_none=True)
        if m.inner_lambda == "reset":
            self.reset_lambda()
        value = self.lam_objective(merge_parameters(self.stack, self.lam, mask, clamp=m.clamp))
        if m.inner_lambda == "carry":
            self.reset_lambda()
        self.inner_opt.step()
        return value

    def mask_step(self, step: int, global_step: int) -> dict[str, float]:
        """The inner step on λ (mask fixed), then the mask's step at the updated λ."""
        m = self.method
        drawn = sample_concrete_mask(self.logits, m.temperature, m._generator(TRAIN_NOISE, global_step))
        mask = rescale_mask(drawn)
        inner = self.inner_step({k: v.detach() for k, v in mask.items()})
        self.mask_opt.zero_grad(set_to_none=True)
        value = self.mask_objective(merge_parameters(self.stack, self.lam.detach(), mask, clamp=m.clamp))
        self.mask_opt.step()
        return {"loss": value, "inner_loss": inner, "mask_density": mask_density(drawn.values())}

    def final_mask(self) -> dict[str, Tensor]:
        """The rescaled final mask (drawn once, seeded; saved if asked)."""
        if not self._final:
            self._final.update(self.method._final_mask(self.logits, self.stack))
        return self._final

    def adamerging_step(self, step: int, global_step: int) -> dict[str, float]:
        """Layer-wise AdaMerging with the final mask, λ from λ0 at its first step."""
        mask = self.final_mask()
        if step == 0:
            self.reset_lambda()
        value = adamerging_step(
            self.stack, self.lam, self.ada_opt, self.lam_objective, clamp=self.method.clamp, mask=mask
        )
        return {"loss": value}
