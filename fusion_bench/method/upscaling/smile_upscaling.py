"""SMILE upscaling: every linear layer becomes a sparse mixture of low-rank experts, without training.

Tang et al., *SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained Foundation
Models*, 2024. https://arxiv.org/abs/2408.10174

Every ``nn.Linear`` of θ0 becomes a :class:`~fusion_bench.models.smile_moe.SmileMoELinear`: the pre-trained
layer plus, per fine-tuned model, the rank-``k`` part of its weight difference (and its bias difference),
routed per token by the norm of the input's projection on each difference's top ``gate_k`` right singular
vectors, top-``top_k`` of a softmax (exact formulas: the model module and docs/algorithms.md). Layers whose
fine-tuned weights all equal θ0's stay as they are. Every other tensor keeps θ0, or with
``average_experts`` the mean of the fine-tuned models, for the parameters of modules without children
(the reference's rule: a parameter held directly by a module with children, such as CLIP's
``class_embedding``, keeps θ0).

Defaults are the reference's (``gate_k`` 1, ``k`` 128, ``top_k`` 1, ``routing_use_diff``, no averaging).
The experts' weights are read one tensor at a time from the pool. ``merged_model_save_path`` writes
``smile_moe.safetensors`` + ``smile_moe.json`` (see :class:`~fusion_bench.models.smile_moe.SmileCLIPVisionModel`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from fusion_bench.errors import ConfigError, ModelLoadError
from fusion_bench.merge.streaming import check_finite, validate_pool
from fusion_bench.method._options import check_bool, check_int
from fusion_bench.method.base_algorithm import BaseAlgorithm, register_algorithm
from fusion_bench.modelpool import PRETRAINED, BaseModelPool
from fusion_bench.models.hf_clip import is_clip_vision_model
from fusion_bench.models.smile_moe import SmileCLIPVisionModel, SmileMoELinear, upscale_linear

__all__ = ["SmileUpscalingAlgorithm"]

log = logging.getLogger(__name__)


@register_algorithm("smile_upscaling")
class SmileUpscalingAlgorithm(BaseAlgorithm):
    """SMILE upscaling (see the module docstring).

    Args:
        gate_k: right singular vectors of each expert's weight difference in the router (≥ 1).
        k: rank of each expert (``k ≤ 0``: the whole weight difference, no compression).
        top_k: experts per token (1..number of models).
        routing_use_diff: route with the SVD of ``Wi − W0`` (else of ``Wi``).
        average_experts: parameters of other leaf modules are the fine-tuned models' mean (else θ0).
        full_matrices: full SVDs (the kept directions are the same either way).
    """

    def __init__(
        self,
        gate_k: int = 1,
        k: int = 128,
        top_k: int = 1,
        routing_use_diff: bool = True,
        average_experts: bool = False,
        full_matrices: bool = True,
    ) -> None:
        self.gate_k = check_int("smile_upscaling", "gate_k", gate_k, low=1)
        if isinstance(k, bool) or not isinstance(k, int):
            raise ConfigError(f"smile_upscaling: option 'k' must be an integer; got {k!r}")
        self.k = int(k)
        self.top_k = check_int("smile_upscaling", "top_k", top_k, low=1)
        self.routing_use_diff = check_bool("smile_upscaling", "routing_use_diff", routing_use_diff)
        self.average_experts = check_bool("smile_upscaling", "average_experts", average_experts)
        self.full_matrices = check_bool("smile_upscaling", "full_matrices", full_matrices)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool) -> nn.Module:
        names, _ = validate_pool(modelpool, min_models=1, with_base=True)
        if self.top_k > len(names):
            raise ConfigError(
                f"smile_upscaling: option 'top_k' ({self.top_k}) exceeds the number of fine-tuned models ({len(names)})"
            )
        model = modelpool.load_model(PRETRAINED)
        if not is_clip_vision_model(model):
            raise ModelLoadError(
                f"smile_upscaling: the pool's models are {type(model).__name__}, not CLIP vision models"
            )
        model.requires_grad_(False)
        keys = {t.data_ptr(): k for k, t in modelpool.canonical_state_dict(model).items()}
        device = self.fabric.device if self.fabric is not None else "cpu"
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        leaves = [(n, m) for n, m in model.named_modules() if not isinstance(m, nn.Linear) and not list(m.children())]
        skipped = []
        for name, module in tqdm(linears, desc="SMILE upscaling", leave=False, disable=None):
            weights = self._read(modelpool, names, keys[module.weight.data_ptr()])
            biases = [None] * len(names)
            if module.bias is not None:
                biases = self._read(modelpool, names, keys[module.bias.data_ptr()])
            upscaled = upscale_linear(
                module,
                weights,
                biases,
                gate_k=self.gate_k,
                k=self.k,
                top_k=self.top_k,
                routing_use_diff=self.routing_use_diff,
                full_matrices=self.full_matrices,
                device=device,
            )
            if upscaled is None:
                skipped.append(name)
                continue
            model.set_submodule(name, upscaled)
        if skipped:
            log.info("smile_upscaling: %d linear layers kept as θ0 (no expert changed them): %s", len(skipped), skipped)
        if self.average_experts:
            for _, module in leaves:
                for _, param in module.named_parameters(recurse=False):
                    values = self._read(modelpool, names, keys[param.data_ptr()])
                    param.copy_((torch.stack(values).sum(0) / len(values)).to(param.dtype))
        self._report = {"upscaled_layers": sum(isinstance(m, SmileMoELinear) for m in model.modules())}
        meta = {"method": "smile_upscaling", "models": names, **self._options()}
        return SmileCLIPVisionModel(model, meta=meta)

    def extra_report(self) -> dict[str, Any]:
        """``{"smile_upscaling": {"upscaled_layers": n}}`` after ``run``."""
        report = getattr(self, "_report", None)
        return {"smile_upscaling": dict(report)} if report else {}

    def _options(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("fabric", "taskpool")}

    @staticmethod
    def _read(modelpool: BaseModelPool, names: list[str], key: str) -> list[torch.Tensor]:
        tensors = [modelpool.get_tensor(n, key) for n in names]
        for name, tensor in zip(names, tensors):
            check_finite(name, key, tensor)
        return [t.to(torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]
