"""The "torch" backend: the op as a thin `torch.library` op around the references.

Usable on any device, and the fallback everywhere. Its forward and backward are
`reference.lora_linear_forward_reference` and `reference.lora_linear_backward_reference`
run in the accumulation dtype, under the same contract as the fused backends (the
same argument checks, outputs and saved tensors: x, U, the seed and the 1-bit keep
mask, which backward unpacks). Unlike the fused backends it runs the LoRA branch as
separate ATen ops with temporaries: D(x) and the bool mask exist while the shrink
runs, and are freed before forward returns.
"""

from __future__ import annotations

import torch

from . import contract, reference

_BACKEND = "torch"


def _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed) -> None:
    contract.check_op_inputs(
        _BACKEND, contract.STORAGE_DTYPES, x, weight, lora_A, lora_B, scaling, dropout_p, seed
    )
    contract.check_bias(bias, x, weight)


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
    _check_inputs(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    M, K = x.shape
    keep = None
    keep_bits = x.new_empty(0, dtype=torch.uint8)  # the contract's [0] without dropout
    if dropout_p > 0.0:
        keep = reference.dropout_keep_mask(seed, M, K, dropout_p, x.device)
        keep_bits = reference.pack_keep_mask(keep)  # [M, ceil(K/8)]
    y, u = reference.lora_linear_forward_reference(
        x, weight, bias, lora_A, lora_B, scaling, dropout_p, keep
    )
    return y, u, keep_bits


torch_forward.register_fake(contract.forward_fake)


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
    _check_inputs(x, weight, None, lora_A, lora_B, scaling, dropout_p, seed)
    contract.check_backward_inputs(x, weight, lora_A, grad_y, u, keep_bits, dropout_p)
    # The forward's packed mask; without one (an empty tensor), the seed's.
    keep = None
    if dropout_p > 0.0 and keep_bits.dim() == 2:
        keep = reference.unpack_keep_mask(keep_bits, x.shape[1])
    grads = reference.lora_linear_backward_reference(
        grad_y,
        x,
        weight,
        lora_A,
        lora_B,
        scaling,
        dropout_p,
        keep,
        seed=seed,
        u=u,
        need_grad_x=need_grad_x,
        need_grad_lora=need_grad_lora,
        need_grad_scaling=need_grad_scaling,
        need_grad_bias=need_grad_bias,
    )
    # Gradients nobody asked for are empty tensors of the dtype they would have had.
    dtypes = (x.dtype, lora_A.dtype, lora_B.dtype, scaling.dtype, x.dtype)
    grad_x, grad_A, grad_B, grad_scaling, grad_bias = (
        x.new_empty(0, dtype=dtype) if grad is None else grad
        for grad, dtype in zip(grads, dtypes, strict=True)
    )
    return grad_x.contiguous(), grad_A, grad_B, grad_scaling, grad_bias


torch_backward.register_fake(contract.backward_fake)


contract.register_lora_autograd(torch_forward, torch_backward)


def availability(name: str) -> tuple[bool, str]:
    return True, "pure PyTorch, always available"


def serves(name: str, device_type: str) -> bool:
    return True


def load(name: str):
    return torch.ops.lora_kernels.torch_forward, torch.ops.lora_kernels.torch_backward
