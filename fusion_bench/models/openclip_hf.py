"""Convert OpenCLIP ViT vision towers to Hugging Face ``CLIPVisionModelWithProjection`` and back.

The two implement the same network (pre-LN ViT, class token, ``ln_post`` on the class token,
linear projection); only names and the fused attention input projection differ:

=====================================  ==============================================
open_clip (``model.visual.`` + ...)     transformers (canonical ``CLIPVisionModel`` keys)
=====================================  ==============================================
``conv1.weight``                        ``embeddings.patch_embedding.weight``
``class_embedding``                     ``embeddings.class_embedding``
``positional_embedding``                ``embeddings.position_embedding.weight``
``ln_pre.*`` / ``ln_post.*``            ``pre_layrnorm.*`` / ``post_layernorm.*``
``transformer.resblocks.i.ln_1/ln_2``   ``encoder.layers.i.layer_norm1/layer_norm2``
``...attn.in_proj_weight`` (3W, W)      ``...self_attn.{q,k,v}_proj.weight`` (W, W) each
``...attn.out_proj.*``                  ``...self_attn.out_proj.*``
``...mlp.c_fc.*`` / ``...mlp.c_proj.*`` ``...mlp.fc1.*`` / ``...mlp.fc2.*``
``proj`` (W, D)                         ``visual_projection.weight`` (D, W) = ``proj.T``
=====================================  ==============================================

QuickGELU maps to ``hidden_act="quick_gelu"``, GELU to ``"gelu"``; a LayerNorm eps other than
1e-5 travels as open_clip ``norm_kwargs``. Towers using other open_clip features (layer scale,
attentional pooling, average pooling, ResNet or timm trunks...) have no HF counterpart and are
refused with a message naming the feature.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch
from torch import nn

from fusion_bench.errors import ModelLoadError
from fusion_bench.models.hf_clip import VISION_PREFIX, vision_state_dict
from fusion_bench.models.openclip_vision import ENCODER_PREFIX, ImageEncoder, OpenCLIPArchitecture, build_image_encoder

__all__ = [
    "hf_config_from_openclip",
    "openclip_architecture_from_hf",
    "openclip_to_hf_state_dict",
    "hf_to_openclip_state_dict",
    "convert_openclip_to_hf",
    "convert_hf_to_openclip",
]

PROJECTION = "visual_projection.weight"
_DEFAULT_EPS = 1e-5
# vision_cfg fields and the only values a HF CLIP vision tower can express
_PLAIN_VIT = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "timm_model_name": None,
    "act_kwargs": None,
    "block_type": None,
    "qk_norm": False,
    "scaled_cosine_attn": False,
    "scale_heads": False,
    "scale_attn_inner": False,
    "scale_attn": False,
    "scale_fc": False,
}
_SIMPLE = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def _check_plain_vit(arch: OpenCLIPArchitecture) -> float:
    """The LayerNorm eps of a plain ViT tower; raises for towers HF cannot express."""
    cfg = arch.vision_cfg
    if isinstance(cfg.get("layers", 12), (list, tuple)):
        raise ModelLoadError(f"OpenCLIP architecture {arch} is a ResNet tower; only ViT towers convert to HF CLIP")
    odd = {k: cfg[k] for k, plain in _PLAIN_VIT.items() if k in cfg and cfg[k] != plain}
    norm = dict(cfg.get("norm_kwargs") or {})
    eps = float(norm.pop("eps", _DEFAULT_EPS))
    if norm:
        odd["norm_kwargs"] = cfg["norm_kwargs"]
    if odd:
        raise ModelLoadError(f"OpenCLIP architecture {arch} uses {odd}, which HF CLIPVisionModel cannot express")
    return eps


def hf_config_from_openclip(arch: OpenCLIPArchitecture) -> Any:
    """The ``CLIPVisionConfig`` of the same network as ``arch``."""
    from transformers import CLIPVisionConfig

    eps = _check_plain_vit(arch)
    cfg = arch.vision_cfg
    width = int(cfg.get("width", 768))
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=int(width * float(cfg.get("mlp_ratio", 4.0))),
        num_hidden_layers=int(cfg.get("layers", 12)),
        num_attention_heads=width // int(cfg.get("head_width", 64)),
        image_size=arch.image_size,
        patch_size=int(cfg.get("patch_size", 16)),
        projection_dim=arch.embed_dim,
        hidden_act="quick_gelu" if arch.quick_gelu else "gelu",
        layer_norm_eps=eps,
    )


def openclip_architecture_from_hf(config: Any) -> OpenCLIPArchitecture:
    """The OpenCLIP architecture of a ``CLIPVisionConfig`` (or a ``CLIPConfig``'s vision part)."""
    config = getattr(config, "vision_config", config)
    if config.hidden_act not in ("quick_gelu", "gelu"):
        raise ModelLoadError(
            f"HF CLIP vision config uses hidden_act {config.hidden_act!r}; open_clip has quick_gelu and gelu"
        )
    vision_cfg: dict[str, Any] = {
        "image_size": int(config.image_size),
        "layers": int(config.num_hidden_layers),
        "width": int(config.hidden_size),
        "patch_size": int(config.patch_size),
        "head_width": config.hidden_size // config.num_attention_heads,
        "mlp_ratio": config.intermediate_size / config.hidden_size,
    }
    if float(config.layer_norm_eps) != _DEFAULT_EPS:
        vision_cfg["norm_kwargs"] = {"eps": float(config.layer_norm_eps)}
    return OpenCLIPArchitecture(int(config.projection_dim), vision_cfg, quick_gelu=config.hidden_act == "quick_gelu")


def _strip(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def openclip_to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP tower tensors (``model.visual.*`` or bare keys) -> HF canonical keys + ``visual_projection.weight``.

    Raises:
        ModelLoadError: a key with no HF counterpart.
    """
    out: dict[str, torch.Tensor] = {}
    for key, t in _strip(state, ENCODER_PREFIX).items():
        block = _BLOCK_KEY.match(key)
        if key in _SIMPLE:
            out[_SIMPLE[key]] = t
        elif key == "proj":
            out[PROJECTION] = t.T.contiguous()  # (W, D) -> (D, W)
        elif block and block.group(2) in _BLOCK:
            out[f"encoder.layers.{block.group(1)}.{_BLOCK[block.group(2)]}.{block.group(3)}"] = t
        elif key.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):  # fused (3W, ...) -> q, k, v
            layer = key.split(".")[2]
            kind = "weight" if key.endswith("weight") else "bias"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                out[f"encoder.layers.{layer}.self_attn.{name}.{kind}"] = part.contiguous()
        else:
            raise ModelLoadError(f"OpenCLIP tensor {key!r} has no counterpart in HF CLIPVisionModel")
    return out


def hf_to_openclip_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP vision tensors (canonical or ``vision_model.`` keys, + ``visual_projection.weight``) ->
    OpenCLIP ``model.visual.*`` keys.

    Raises:
        ModelLoadError: the projection is missing, or a key has no open_clip counterpart.
    """
    state = _strip(state, VISION_PREFIX)
    if PROJECTION not in state:
        raise ModelLoadError(
            f"HF CLIP vision state dict has no {PROJECTION!r}: pass the CLIP model's visual_projection"
        )
    simple = {hf: oc for oc, hf in _SIMPLE.items()}
    block = {hf: oc for oc, hf in _BLOCK.items()}
    out: dict[str, torch.Tensor] = {"proj": state[PROJECTION].T.contiguous()}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        match = _HF_BLOCK_KEY.match(key)
        if key == PROJECTION or key.endswith("position_ids"):
            continue
        if key in simple:
            out[simple[key]] = t
        elif match and match.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((match.group(1), match.group(3)), {})[match.group(2)[-6:]] = t
        elif match and match.group(2) in block:
            out[f"transformer.resblocks.{match.group(1)}.{block[match.group(2)]}.{match.group(3)}"] = t
        else:
            raise ModelLoadError(f"HF CLIP vision tensor {key!r} has no counterpart in an OpenCLIP tower")
    for (layer, kind), parts in qkv.items():
        fused = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)  # (3W, ...)
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = fused
    return {ENCODER_PREFIX + k: v for k, v in out.items()}


def convert_openclip_to_hf(encoder: ImageEncoder) -> nn.Module:
    """A ``CLIPVisionModelWithProjection`` computing the same ``image_embeds`` as ``encoder``."""
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(hf_config_from_openclip(encoder.architecture))
    state = openclip_to_hf_state_dict(encoder.state_dict())
    target_keys = model.state_dict()
    prefix = VISION_PREFIX if any(k.startswith(VISION_PREFIX) for k in target_keys) else ""
    mapped = {(k if k == PROJECTION else prefix + k): v for k, v in state.items()}
    buffers = {k for k in target_keys if k.endswith("position_ids")}
    missing = sorted(set(target_keys) - set(mapped) - buffers)
    if missing:
        raise ModelLoadError(f"converting to HF CLIP: no OpenCLIP tensor for {missing[:3]}")
    model.load_state_dict(mapped, strict=False)
    return model.eval()


def convert_hf_to_openclip(model: nn.Module, visual_projection: nn.Module | torch.Tensor | None = None) -> ImageEncoder:
    """An OpenCLIP :class:`ImageEncoder` computing the same features as a HF CLIP vision model.

    Args:
        model: a ``CLIPVisionModelWithProjection``, or a ``CLIPVisionModel`` (then give ``visual_projection``).
        visual_projection: the CLIP model's ``visual_projection`` (a ``Linear`` or its (D, W) weight).
    """
    state = vision_state_dict(model)
    if visual_projection is not None:
        weight = visual_projection.weight if isinstance(visual_projection, nn.Module) else visual_projection
        state[PROJECTION] = weight.detach()
    arch = openclip_architecture_from_hf(model.config)
    return build_image_encoder(arch, hf_to_openclip_state_dict(state), what="converted HF CLIP vision model")
