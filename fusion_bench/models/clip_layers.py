"""Running a CLIP vision encoder piece by piece (layer-wise merges such as RegMean++).

The encoder is ``embeddings -> pre_layrnorm -> encoder.layers[0..L-1] -> post_layernorm(first
token)``. These helpers run the parts on their own, in both transformers layouts (4.x: the parts
under ``.vision_model`` and layers returning tuples; 5.x: on the model itself, layers returning a
tensor).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from fusion_bench.models.hf_clip import vision_encoder_layers

__all__ = ["vision_embed", "encoder_layer_forward", "encoder_layer_names"]


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "vision_model", model)


def vision_embed(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The input of the first encoder layer: ``pre_layrnorm(embeddings(pixel_values))``, ``(B, T, D)``."""
    inner = _inner(model)
    return inner.pre_layrnorm(inner.embeddings(pixel_values))


def encoder_layer_forward(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """One ``CLIPEncoderLayer`` without attention masks (as the vision encoder runs it), ``(B, T, D)``."""
    if "causal_attention_mask" in inspect.signature(layer.forward).parameters:  # transformers 4
        out = layer(hidden_states, None, None)
    else:
        out = layer(hidden_states, None)
    return out[0] if isinstance(out, tuple) else out


def encoder_layer_names(model: nn.Module) -> list[str]:
    """The module name (in ``model.named_modules()``) of each encoder layer, in order."""
    ids = {id(layer): i for i, layer in enumerate(vision_encoder_layers(model))}
    names = [""] * len(ids)
    for name, module in model.named_modules():
        if id(module) in ids:
            names[ids[id(module)]] = name
    return names
