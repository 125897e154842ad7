"""The "torch" backend: the op in ATen calls, usable on any device.

The fallback everywhere. It follows the memory rule of the fused backends (saves x,
U, the seed and the 1-bit keep mask, which backward unpacks), but runs the LoRA
branch as separate ATen ops with temporaries: D(x) and the bool mask exist while the
shrink runs, and are freed before forward returns.
"""

from __future__ import annotations

import torch

from . import reference
from .contract import backward_fake, forward_fake, register_lora_autograd


def _keep_mask(x: torch.Tensor, dropout_p: float, seed: torch.Tensor) -> torch.Tensor | None:
    """The keep mask for x [M, K], or None without dropout."""
    if dropout_p == 0.0:
        return None
    return reference.dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, x.device)


def _branch_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


@torch.library.custom_op("lora_kernels::torch_forward", mutates_args=())
def torch_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cdt = _branch_dtype(x)
    keep = _keep_mask(x, dropout_p, seed)
    if keep is None:
        keep_bits = x.new_empty(0, dtype=torch.uint8)
    else:
        keep_bits = reference.pack_keep_mask(keep)
    u = reference.apply_dropout(x.to(cdt), keep, dropout_p) @ lora_A.to(cdt).t()
    y = torch.nn.functional.linear(x, weight, bias)
    if y.dtype == cdt:
        y.addmm_(u * scaling, lora_B.t().to(cdt))
    else:
        # In half precision s U alone may overflow where Y does not: form the sum in
        # float32 and round once.
        y = torch.addmm(y.to(cdt), u * scaling, lora_B.t().to(cdt)).to(x.dtype)
    return y, u, keep_bits


torch_forward.register_fake(forward_fake)


@torch.library.custom_op("lora_kernels::torch_backward", mutates_args=())
def torch_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
    u: torch.Tensor,
    keep_bits: torch.Tensor,
    need_grad_x: bool,
    need_grad_lora: bool,
    need_grad_scaling: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    cdt = u.dtype
    keep = None
    if dropout_p > 0.0 and (need_grad_x or need_grad_lora):
        # The forward's packed mask; without one (an empty tensor), the seed's.
        if keep_bits.dim() == 2:
            keep = reference.unpack_keep_mask(keep_bits, x.shape[1])
        else:
            keep = _keep_mask(x, dropout_p, seed)
    g = grad_y.to(cdt) @ lora_B.to(cdt)  # [M, R]
    # Gradients nobody asked for are empty tensors of the dtype they would have had.
    grad_x = x.new_empty(0)
    grad_A = lora_A.new_empty(0)
    grad_B = lora_B.new_empty(0)
    grad_scaling = scaling.new_empty(0)
    grad_bias = x.new_empty(0)
    if need_grad_x:
        dropped_ga = reference.apply_dropout(g @ lora_A.to(cdt), keep, dropout_p)
        # Summed in the branch dtype, rounded once (as the forward's LoRA term).
        grad_x = ((grad_y @ weight).to(cdt) + scaling * dropped_ga).to(x.dtype)
    if need_grad_lora:
        dropped_x = reference.apply_dropout(x.to(cdt), keep, dropout_p)
        grad_A = (scaling * g.t() @ dropped_x).to(lora_A.dtype)
        grad_B = (scaling * grad_y.t().to(cdt) @ u).to(lora_B.dtype)
    if need_grad_scaling:
        grad_scaling = (g * u).sum().to(scaling.dtype)
    if need_grad_bias:
        grad_bias = grad_y.sum(0, dtype=cdt).to(x.dtype)
    return grad_x.contiguous(), grad_A, grad_B, grad_scaling, grad_bias


torch_backward.register_fake(backward_fake)


register_lora_autograd(torch_forward, torch_backward)


def availability(name: str) -> tuple[bool, str]:
    return True, "pure PyTorch, always available"


def serves(name: str, device_type: str) -> bool:
    return True


def load(name: str):
    return torch.ops.lora_kernels.torch_forward, torch.ops.lora_kernels.torch_backward
