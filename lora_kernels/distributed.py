"""4-bit (bitsandbytes) base layers under FSDP2: `prepare_4bit_for_fsdp`.

FSDP2 (`torch.distributed.fsdp.fully_shard`) replaces every parameter by a sharded
DTensor and, around each forward and backward, by a plain tensor all-gathered from the
shards. Two things a bitsandbytes `Params4bit` carries do not survive that unharmed:

- Its `quant_state` (absmax, the code table, the nested absmax) is a Python attribute
  of the parameter object, which FSDP2 drops. bitsandbytes recovers it from the
  layer's own `Linear4bit.quant_state` (`fix_4bit_weight_quant_state_from_module`, as
  `Linear4bit.forward` and LoRALinear's 4-bit path call it); that copy must be set.
- Its packed bytes, when `quant_storage` is a float dtype (bf16 / fp16: FSDP1 needed
  one, its flat parameter holds one dtype), are copied by FSDP2 as floats:
  - on CUDA, `torch._foreach_copy_` (FSDP2's all-gather copy-in, taken when every
    parameter of a group has that dtype) passes 16-bit floats through float32 and
    writes every NaN as one canonical pattern (pytorch/pytorch#159333), so the bytes of
    the about 1 in 500 elements whose two codes spell a NaN change, and with them the
    dequantized weight (bitsandbytes/bitsandbytes#1945). On the CPU that copy moves
    bits, so the gloo tests here cannot show it;
  - with `MixedPrecisionPolicy(param_dtype=...)` of another float dtype, FSDP2 casts
    the packed bytes as numbers before the all-gather, on every device: the weight is
    destroyed.

FSDP2 shards each parameter on its own, so nothing needs a float dtype: stored as uint8,
the packed bytes are never cast (FSDP2 casts floating-point parameters only), and an
integer `_foreach_copy_` copies bits. `prepare_4bit_for_fsdp` re-stores every 4-bit
weight so and sets each layer's quant state copy; call it before `fully_shard`.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from . import quant4bit


def prepare_4bit_for_fsdp(model: nn.Module) -> list[str]:
    """Make every bitsandbytes 4-bit weight of `model` survive `fully_shard`, in place:
    its packed bytes re-stored as uint8 [ceil(n/2), 1] (the same bytes, a float
    `quant_storage` only reinterpreted) and its layer's `quant_state` set, from which
    bitsandbytes re-attaches it to the gathered weight. Call it on every rank before
    `fully_shard`, after the weights are quantized (moved to their device).

    Returns the names of the modules whose weight is 4-bit. Raises ValueError for a
    4-bit weight that is not quantized yet, or a model FSDP2 already shards.
    """
    prepared = []
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if _is_dtensor(weight) and _is_linear4bit(module):
            raise ValueError(
                f"prepare_4bit_for_fsdp: {name or 'the model'} is already sharded by "
                "fully_shard (its weight is a DTensor): call it before fully_shard"
            )
        if not quant4bit.is_4bit_weight(weight):
            continue
        quant_state = weight.quant_state
        if quant_state is None:
            raise ValueError(
                f"prepare_4bit_for_fsdp: the 4-bit weight of {name or 'the model'} is not "
                "quantized yet (quant_state is None): move the model to its device first"
            )
        if weight.dtype != torch.uint8:
            module.weight = _as_uint8(weight, module)
            module.weight.quant_state = quant_state
        if hasattr(module, "quant_storage"):
            module.quant_storage = torch.uint8
        module.quant_state = quant_state
        prepared.append(name)
    return prepared


def _is_linear4bit(module: nn.Module) -> bool:
    modules = sys.modules.get("bitsandbytes.nn")
    return modules is not None and isinstance(module, modules.Linear4bit)


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def _as_uint8(weight, module: nn.Module):
    """A uint8 Params4bit holding weight's packed bytes (without a float storage's
    padding byte), with its other attributes."""
    from bitsandbytes.nn import Params4bit

    nbytes = (math.prod(weight.quant_state.shape) + 1) // 2
    packed = weight.detach().reshape(-1).view(torch.uint8)[:nbytes].clone().reshape(-1, 1)
    return Params4bit(
        packed,
        requires_grad=False,
        quant_state=weight.quant_state,
        blocksize=weight.blocksize,
        compress_statistics=weight.compress_statistics,
        quant_type=weight.quant_type,
        quant_storage=torch.uint8,
        module=module,
        bnb_quantized=True,
    )
