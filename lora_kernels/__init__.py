"""Fused kernels for LoRA fine-tuning: Y = X W^T + b + s * (dropout(X) A^T) B^T."""

from .backends import BACKENDS, available_backends
from .ops import lora_linear
from .reference import dropout_keep_mask, lora_linear_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "__version__",
    "available_backends",
    "dropout_keep_mask",
    "lora_linear",
    "lora_linear_reference",
]
