"""``clip_regmean_plusplus``: RegMean++, RegMean with the Gram matrices taken through the merged layers.

Nguyen et al., *RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model
Merging*, 2025. https://arxiv.org/abs/2508.03121

RegMean (:mod:`fusion_bench.method.data.regmean`) takes the inputs of model i's layer l from model i's
own earlier layers; the merged model will feed layer l from the *merged* earlier layers instead.
RegMean++ takes that into account, layer by layer:

1. every tensor of the embeddings, ``pre_layrnorm`` and the encoder layers that RegMean does not
   solve (embeddings, layer norms, biases) is the mean of the fine-tuned models, as in RegMean;
   tensors outside them (``post_layernorm``) keep their pre-trained values, as the reference does
   (``outside_encoder: average`` averages them too); excluded tensors keep their pre-trained values;
2. ``X_i⁰ = pre_layrnorm(embeddings(images_i))`` with the merged embeddings, for the first
   ``num_regmean_examples`` train images of each model's task;
3. for l = 0..L-1: run model i's own layer l on ``X_iˡ`` with forward hooks, giving its Gram
   matrices ``G_i`` (each linear layer's input, every token); merge the layer's linear weights as
   RegMean does, ``W* = (Σ G̃_i)⁻¹ Σ G̃_i W_iᵀ``; then ``X_iˡ⁺¹ = merged layer l (X_iˡ)``.

Memory: the
merged model, one layer of one fine-tuned model (read tensor by tensor from the pool) and the
features ``X_iˡ`` of every task (``num_regmean_examples × tokens × width`` each). With
``checkpoint_path`` the state is saved after every layer and a rerun resumes after the last one.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from fusion_bench.errors import IncompatibleModelsError
from fusion_bench.merge import check_finite
from fusion_bench.method.test_time.clip_heads import CLIPTaskClassifiers
from fusion_bench.method.data.base import canonical_parameter_names, fabric_or_cpu, log_metrics
from fusion_bench.method._options import check_choice
from fusion_bench.method.base_algorithm import register_algorithm
from fusion_bench.method.data.regmean import RegMeanAccumulator, RegMeanAlgorithmForCLIP
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.models.clip_layers import encoder_layer_forward, encoder_layer_names, vision_embed
from fusion_bench.models.hf_clip import vision_encoder_layers
from fusion_bench.models.linear_grams import LinearInputGrams, linear_modules
from fusion_bench.utils.checkpoint import load_checkpoint, save_checkpoint

__all__ = ["RegMeanAlgorithmForCLIPPlusPlus"]

NAME = "clip_regmean_plusplus"
Features = dict[str, list[torch.Tensor]]
REGRESSED_PREFIXES = ("embeddings.", "pre_layrnorm.", "encoder.")  # canonical keys RegMean++ walks through
OUTSIDE_ENCODER = ("pretrained", "average")


@register_algorithm(NAME)
class RegMeanAlgorithmForCLIPPlusPlus(RegMeanAlgorithmForCLIP):
    """RegMean++ over a CLIP pool's fine-tuned vision encoders (see module docstring).

    Args:
        outside_encoder: the tensors outside the embeddings, ``pre_layrnorm`` and the encoder
            layers (``post_layernorm``): ``"pretrained"`` (kept, the reference) or ``"average"``.
        others: those of :class:`~fusion_bench.method.data.regmean.RegMeanAlgorithmForCLIP`;
            ``checkpoint_path`` is written after every encoder layer.
    """

    def __init__(self, *, outside_encoder: str = "pretrained", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.outside_encoder = check_choice(NAME, "outside_encoder", outside_encoder, OUTSIDE_ENCODER)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "outside_encoder": self.outside_encoder}

    def _kept(self, key: str) -> bool:
        """Whether ``key`` keeps its pre-trained value (excluded, or outside the regressed modules)."""
        outside = not key.startswith(REGRESSED_PREFIXES) and self.outside_encoder == "pretrained"
        return outside or self.is_excluded(key)

    # ---- steps ------------------------------------------------------------------------------
    def _layer_keys(self, modelpool: BaseModelPool, model: nn.Module) -> list[dict[str, str]]:
        """Per encoder layer: ``{parameter name inside the layer: canonical key}``."""
        keys = canonical_parameter_names(modelpool, model)
        return [
            {k[len(prefix) + 1 :]: v for k, v in keys.items() if k.startswith(prefix + ".")}
            for prefix in encoder_layer_names(model)
        ]

    def _solved_keys(self, layer_keys: list[dict[str, str]], model: nn.Module) -> set[str]:
        """The canonical keys of the encoder layers' linear weights that RegMean solves."""
        layers = vision_encoder_layers(model)
        solved = {keys[f"{m}.weight"] for keys, layer in zip(layer_keys, layers) for m in linear_modules(layer)}
        solved = {k for k in solved if not self.is_excluded(k)}
        if not solved:
            raise IncompatibleModelsError(
                f"{NAME}: the encoder layers have no nn.Linear weight to merge (all excluded?)"
            )
        return solved

    @torch.no_grad()
    def _average_the_rest(self, modelpool: BaseModelPool, names: list[str], model: nn.Module, solved: set[str]) -> None:
        """Step 1: every other float tensor of ``model`` not kept at θ0 = the mean of the fine-tuned models (streamed)."""
        for key, target in modelpool.canonical_state_dict(model).items():
            if key in solved or self._kept(key):
                continue
            if not target.is_floating_point():
                for name in names:
                    if not torch.equal(modelpool.get_tensor(name, key), target):
                        raise IncompatibleModelsError(f"model {name!r}, non-float tensor {key!r} differs from the base")
                continue
            total = torch.zeros_like(target, dtype=torch.float32)
            for name in names:
                tensor = modelpool.get_tensor(name, key)
                check_finite(name, key, tensor)
                total += tensor.float()
            target.copy_(total / len(names))

    @torch.no_grad()
    def _first_features(self, data: CLIPTaskClassifiers, names: list[str], model: nn.Module, fabric: Any) -> Features:
        """Step 2: each task's images through the merged embeddings and ``pre_layrnorm``."""
        features: Features = {}
        for index, name in enumerate(names):
            with fabric.autocast():
                features[name] = [vision_embed(model, x) for x in self._batches(data, index, name, fabric)]
            self.per_model[name] = {"num_examples": sum(x.shape[0] for x in features[name])}
        return features

    def _model_layer(self, modelpool: BaseModelPool, name: str, layer: nn.Module, keys: Mapping[str, str]) -> nn.Module:
        """A copy of ``layer`` holding model ``name``'s tensors (read one by one from the pool)."""
        own = copy.deepcopy(layer)
        with torch.no_grad():
            for pname, param in own.named_parameters():
                tensor = modelpool.get_tensor(name, keys[pname])
                check_finite(name, keys[pname], tensor)
                param.copy_(tensor)
        return own

    @torch.no_grad()
    def _merge_layer(
        self,
        modelpool: BaseModelPool,
        names: list[str],
        layer: nn.Module,
        keys: Mapping[str, str],
        solved: set[str],
        features: Features,
        fabric: Any,
    ) -> dict[str, torch.Tensor]:
        """Step 3 for one layer: the solved weights of ``layer`` from each model's Grams on its features."""
        acc = RegMeanAccumulator(reduce_non_diagonal_ratio=self.reduce_non_diagonal_ratio)
        for name in names:
            own = self._model_layer(modelpool, name, layer, keys)
            modules = {m: mod for m, mod in linear_modules(own).items() if keys[f"{m}.weight"] in solved}
            with LinearInputGrams(modules) as hooks:
                for x in features[name]:
                    with fabric.autocast():
                        encoder_layer_forward(own, x)
            grams = {keys[f"{m}.weight"]: g.cpu() for m, g in hooks.grams().items()}
            acc.add({keys[f"{m}.weight"]: mod.weight.detach().cpu().float() for m, mod in modules.items()}, grams)
        return acc.result()

    # ---- the run ----------------------------------------------------------------------------
    def _resume_layers(
        self, meta: Mapping[str, Any], own: Mapping[str, torch.Tensor], fabric: Any
    ) -> tuple[int, Features | None]:
        """Load ``checkpoint_path`` if there is one: the solved weights into ``own``; the next layer and its features."""
        if self.checkpoint_path is None or not Path(self.checkpoint_path).expanduser().is_file():
            return 0, None
        state = load_checkpoint(self.checkpoint_path, expect=meta, what=f"{NAME}: checkpoint")
        with torch.no_grad():
            for key, value in state["solved"].items():
                own[key].copy_(value.to(own[key].device, own[key].dtype))
        self.per_model = {k: dict(v) for k, v in state["per_model"].items()}
        self.seconds_per_layer = list(state["seconds_per_layer"])
        features = {name: [fabric.to_device(x) for x in batches] for name, batches in state["features"].items()}
        return int(state["next_layer"]), features

    def _layer_step(
        self,
        modelpool: BaseModelPool,
        names: list[str],
        model: nn.Module,
        index: int,
        keys: Mapping[str, str],
        solved: set[str],
        features: Features,
        fabric: Any,
    ) -> Features:
        """Merge encoder layer ``index`` into ``model``; return the features entering the next layer."""
        start = time.perf_counter()
        layers, own = vision_encoder_layers(model), modelpool.canonical_state_dict(model)
        merged = self._merge_layer(modelpool, names, layers[index], keys, solved, features, fabric)  # canonical keys
        with torch.no_grad():
            for key, value in merged.items():
                own[key].copy_(value.to(own[key].device, own[key].dtype))
            if index + 1 < len(layers):
                with fabric.autocast():
                    features = {n: [encoder_layer_forward(layers[index], x) for x in xs] for n, xs in features.items()}
        self.seconds_per_layer.append(round(time.perf_counter() - start, 3))
        log_metrics(fabric, {f"{NAME}/seconds_per_layer": self.seconds_per_layer[-1]}, step=index)
        return features

    def run(self, modelpool: BaseModelPool) -> nn.Module:
        """Merge layer by layer (see module docstring) and return the merged vision encoder."""
        data, names, keys = self._validate_pool(modelpool)
        fabric = fabric_or_cpu(self.fabric)
        self.per_model, self.seconds_per_layer = {}, []
        model = modelpool.load_pretrained_model()
        layer_keys = self._layer_keys(modelpool, model)
        solved = self._solved_keys(layer_keys, model)
        self._average_the_rest(modelpool, names, model, solved)
        model = fabric.to_device(model)
        own = modelpool.canonical_state_dict(model)
        meta = self._checkpoint_meta(modelpool, names, keys)
        start_layer, features = self._resume_layers(meta, own, fabric)
        if features is None:
            features = self._first_features(data, names, model, fabric)
        for index in tqdm(range(start_layer, len(layer_keys)), desc=NAME, disable=None):
            features = self._layer_step(modelpool, names, model, index, layer_keys[index], solved, features, fabric)
            done = {k for keys in layer_keys[: index + 1] for k in keys.values()} & solved
            self._save_layer(meta, index + 1, own, done, features)
        return model.cpu().eval()

    def _save_layer(
        self,
        meta: Mapping[str, Any],
        next_layer: int,
        own: Mapping[str, torch.Tensor],
        solved: set[str],
        features: Features,
    ) -> None:
        """Checkpoint: the weights solved so far, the features entering ``next_layer``, the report."""
        if self.checkpoint_path is None:
            return
        state = {
            "next_layer": next_layer,
            "per_model": self.per_model,
            "seconds_per_layer": self.seconds_per_layer,
            "solved": {k: own[k].detach().cpu() for k in sorted(solved)},
            "features": {n: [x.cpu() for x in xs] for n, xs in features.items()},
        }
        save_checkpoint(self.checkpoint_path, state, meta=meta)

    def extra_report(self) -> dict[str, Any]:
        """Images per model and the seconds of each layer's merge."""
        if not self.per_model:
            return {}
        return {NAME: {**self.per_model, "seconds_per_layer": list(self.seconds_per_layer)}}
