"""Linearised models and LoRA / L-LoRA CLIP vision encoders.

* :class:`LinearizedModule`: a module's first-order Taylor expansion (``torch.func.jvp``).
* :func:`load_lora_vision_model_hf` / :func:`load_l_lora_vision_model_hf`: base + peft adapter.
* :mod:`~fusion_bench.models.linearized.lora`: the adapter format and its exact weight-space fold.
"""

from fusion_bench.models.linearized.linearized_model import LinearizedModule
from fusion_bench.models.linearized.lora import (
    LoRAAdapter,
    is_adapter_folder,
    read_adapter,
)
from fusion_bench.models.linearized.vision_model import (
    adapter_from_model,
    fold_adapter_,
    linearize_lora_model_,
    load_l_lora_vision_model_hf,
    load_lora_vision_model_hf,
    merge_lora_model,
    new_lora_vision_model,
    save_lora_adapter,
)

__all__ = [
    "LinearizedModule",
    "LoRAAdapter",
    "is_adapter_folder",
    "read_adapter",
    "adapter_from_model",
    "fold_adapter_",
    "linearize_lora_model_",
    "merge_lora_model",
    "load_l_lora_vision_model_hf",
    "load_lora_vision_model_hf",
    "new_lora_vision_model",
    "save_lora_adapter",
]
