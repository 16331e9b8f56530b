"""AdaMerging + Representation Surgery: layer-wise AdaMerging, then one surgery module per task.

Yang et al., *Representation Surgery for Multi-Task Model Merging*, ICML 2024. https://arxiv.org/abs/2402.02705
(on top of Yang et al., *AdaMerging*, ICLR 2024, https://arxiv.org/abs/2310.02575).

1. Layer-wise AdaMerging exactly as ``clip_layer_wise_adamerging`` (same options; ``weights=`` also takes a
   file saved by ``clip_layer_wise_adamerging``).
2. Surgery (:mod:`fusion_bench.models.surgery`): per task t a module ``z′ = z − W_up ReLU(W_down z)`` on the
   merged encoder's normalised projected features (D → ``surgery_hidden_dim`` 16 → D, ``W_up`` = 0 at start,
   ``W_down`` Kaiming-uniform, seeded). Each of ``surgery_steps`` (1000) steps draws one unlabelled test batch
   per task (the streams continue where AdaMerging stopped) and, task by task, takes one Adam step
   (lr ``surgery_lr`` 1e-3) on the mean absolute difference between z′ and the expert's normalised projected
   features of the same images.

The result needs the task at inference: the CLIP task pool evaluates task t with t's surgery. Defaults are the
reference's. The surgery phase checkpoints and resumes like the AdaMerging phase.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_bench.errors import ConfigError
from fusion_bench.method._options import check_int, check_range
from fusion_bench.method.base_algorithm import register_algorithm
from fusion_bench.method.test_time.adamerging import (
    CLIPLayerWiseAdaMergingAlgorithm,
    finish_coefficients,
    load_merging_weights,
)
from fusion_bench.method.test_time.base import Phase, derived_seed, make_optimizer
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.models.functional_merge import TaskVectorStack, merge_parameters, unload
from fusion_bench.models.surgery import SurgeryCLIPVisionModel, SurgeryModule

__all__ = ["surgery_step", "CLIPLayerWiseAdaMergingSurgeryAlgorithm"]

SURGERY_SEED = 7  # mixed with ``seed`` for the modules' initialisation


def surgery_step(
    module: SurgeryModule,
    optimizer: torch.optim.Optimizer,
    merged: Tensor,
    expert: Tensor,
    *,
    before_step: Callable[[list[Tensor]], None] | None = None,
) -> float:
    """One surgery update of one task: L1 between ``module(merged)`` and ``expert`` features, one step.

    Args:
        module: the task's surgery module.
        optimizer: over (at least) its parameters; other tasks' parameters have no gradient here.
        merged: the merged encoder's normalised projected features ``(B, D)`` (no gradient).
        expert: the expert's, same shape.
        before_step: called with the module's parameters between backward and step (averaging gradients
            over devices).

    Returns:
        the loss before the step.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = F.l1_loss(module(merged), expert)
    loss.backward()
    if before_step is not None:
        before_step(list(module.parameters()))
    optimizer.step()
    return float(loss.item())


@register_algorithm("clip_layer_wise_adamerging_surgery")
class CLIPLayerWiseAdaMergingSurgeryAlgorithm(CLIPLayerWiseAdaMergingAlgorithm):
    __doc__ = (__doc__ or "") + (
        "\n\nArgs:\n    surgery_steps: surgery steps (each: one batch and one update per task).\n"
        "    surgery_lr: Adam's learning rate for the surgery modules.\n"
        "    surgery_hidden_dim: h of ``W_down`` (h × D).\n"
        "    every other option: see ``clip_layer_wise_adamerging``.\n"
    )

    needs_task_at_inference = True  # the result is evaluated task by task (the task-conditioned protocol)

    def __init__(
        self,
        *,
        surgery_steps: int = 1000,
        surgery_lr: float = 1e-3,
        surgery_hidden_dim: int = 16,
        **adamerging: Any,
    ) -> None:
        super().__init__(**adamerging)
        self.surgery_steps = check_int(self.name, "surgery_steps", surgery_steps, low=0)
        self.surgery_lr = check_range(self.name, "surgery_lr", surgery_lr, low=0.0, low_open=True)
        self.surgery_hidden_dim = check_int(self.name, "surgery_hidden_dim", surgery_hidden_dim, low=1)

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """AdaMerging (or ``weights``), then the surgery; returns the task-conditioned model."""
        saved = self._read_weights(modelpool)
        heads = self.check_test_datasets(modelpool)
        skeleton, stack = self.setup_task_vectors(modelpool)
        self.setup_test_time(modelpool, skeleton, heads)
        if saved is not None:
            coefficients = self._check_weights(saved, stack).to(self.fabric.device)
        else:
            coefficients = self._learn(stack, modelpool)
        self.merging_weights = finish_coefficients(
            self, coefficients, stack, clamp=self.clamp, save_path=self.save_merging_weights
        )
        self.model_names = list(stack.models)
        with torch.no_grad():
            merged = merge_parameters(stack, self.merging_weights.to(self.fabric.device))
        encoder = unload(skeleton, merged).requires_grad_(False).eval()
        surgeries = self._surgery(encoder, stack, modelpool)
        meta = {"method": self.name, "models": self.model_names, "surgery_hidden_dim": self.surgery_hidden_dim}
        return SurgeryCLIPVisionModel(encoder.to(self.model_dtype).cpu(), surgeries, meta=meta).cpu()

    def _surgery(
        self, encoder: nn.Module, stack: TaskVectorStack, modelpool: BaseModelPool
    ) -> dict[str, SurgeryModule]:
        device = self.fabric.device
        dim = self._heads.clip_model.visual_projection.out_features
        generator = torch.Generator().manual_seed(derived_seed(self.seed, SURGERY_SEED))
        modules = {t: SurgeryModule(dim, self.surgery_hidden_dim, generator=generator).to(device) for t in self.tasks}
        params = [p for m in modules.values() for p in m.parameters()]
        optimizer = make_optimizer("adam", params, self.surgery_lr)
        merged = {t: self._heads.classifier(encoder, t).to(device).eval() for t in self.tasks}
        experts = {}
        for task in self.tasks:
            expert = modelpool.load_model(task).requires_grad_(False).eval()
            experts[task] = self._heads.classifier(expert, task).to(device).eval()

        def step(step: int, global_step: int) -> dict[str, float]:
            total = 0.0
            for task in self.tasks:
                pixels = self._next_pixels(task)
                with torch.no_grad():
                    target = experts[task].image_embeds(pixels)
                    features = merged[task].image_embeds(pixels)
                total += surgery_step(modules[task], optimizer, features, target, before_step=self.average_gradients)
            self._drawn += 1
            return {"loss": total}

        state = {"surgery": {f"{t}.{k}": v for t, m in modules.items() for k, v in m.named_parameters()}}
        self.train(
            [Phase("surgery", self.surgery_steps, step)],
            {**state, "optimizer": optimizer},
            self._surgery_identity(stack, modelpool),
        )
        return {t: m.requires_grad_(False).cpu() for t, m in modules.items()}

    def _surgery_identity(self, stack: TaskVectorStack, modelpool: BaseModelPool) -> dict[str, Any]:
        weights = self.merging_weights.detach().cpu().numpy().tobytes()
        return {
            **self.identity(stack, modelpool),
            "phase": "surgery",
            "merging_weights": hashlib.blake2b(weights, digest_size=12).hexdigest(),
            "surgery": {"lr": self.surgery_lr, "hidden_dim": self.surgery_hidden_dim, "drawn": self._drawn},
        }

    def _read_weights(self, modelpool: BaseModelPool) -> Any:
        """Also accepts a file written by ``clip_layer_wise_adamerging``."""
        if not isinstance(self.weights, str):
            return super()._read_weights(modelpool)
        try:
            return super()._read_weights(modelpool)
        except ConfigError:
            return load_merging_weights(self.weights, method="clip_layer_wise_adamerging", models=modelpool.model_names)

    def extra_report(self) -> dict[str, Any]:
        report = super().extra_report()
        if report:
            report[self.name]["surgery_steps"] = self.surgery_steps
        return report
