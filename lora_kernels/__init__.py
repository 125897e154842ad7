"""Fused kernels for LoRA fine-tuning: Y = X W^T + b + s * (dropout(X) A^T) B^T."""

from .adapter_format import load_adapter, save_adapter
from .backends import BACKENDS, available_backends
from .distributed import prepare_4bit_for_fsdp
from .layer import LoRALinear
from .model import (
    ModuleToSave,
    apply_lora,
    count_parameters,
    load_lora_state_dict,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    remove_lora,
    set_lora_enabled,
)
from .ops import dora_linear, lora_linear
from .peft_patch import PatchReport, patch_peft, unpatch_peft
from .quant4bit import dequantize_4bit
from .reference import dora_linear_reference, dropout_keep_mask, lora_linear_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "LoRALinear",
    "ModuleToSave",
    "PatchReport",
    "__version__",
    "apply_lora",
    "available_backends",
    "count_parameters",
    "dequantize_4bit",
    "dora_linear",
    "dora_linear_reference",
    "dropout_keep_mask",
    "load_adapter",
    "load_lora_state_dict",
    "lora_disabled",
    "lora_layers",
    "lora_linear",
    "lora_linear_reference",
    "lora_state_dict",
    "mark_only_lora_as_trainable",
    "merge_lora",
    "patch_peft",
    "prepare_4bit_for_fsdp",
    "remove_lora",
    "save_adapter",
    "set_lora_enabled",
    "unpatch_peft",
]
