"""The autograd formula of the op, attached once to every backend's forward op.

What backward keeps (design notes, "What backward may keep"): x itself, U [M, R] (the
"cpu" backend without dropout returns it empty and recomputes it in backward), the
seed and, with dropout, the keep mask packed one bit per element (`keep_bits`, so
backward reads the mask instead of generating it again). The frozen weight and the
adapters are parameters, not activations. A
backend's backward op gets flags for the gradients autograd asks for, so that a
frozen first layer skips the dX GEMM and a frozen adapter skips dA and dB.
"""

from __future__ import annotations

import torch

# Positions of the forward op's inputs (docs/backends.md).
_X, _WEIGHT, _BIAS, _A, _B, _SCALING, _P, _SEED = range(8)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, u, keep_bits = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, scaling, seed, u, keep_bits)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(u, keep_bits)


def _check_first_order(*grads: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(g.requires_grad for g in grads):
        raise RuntimeError(
            "lora_kernels: double backward (a gradient of a gradient) through lora_linear "
            "is not supported; use lora_kernels.reference.lora_linear_reference for "
            "higher-order derivatives"
        )


def keep_bits_shape(M: int, K: int, dropout_p: float) -> tuple[int, ...]:
    """The shape of the forward's `keep_bits`: [M, ceil(K/8)] with dropout, else [0]."""
    return (M, (K + 7) // 8) if dropout_p > 0.0 else (0,)


def forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """The forward op's outputs as the contract shapes them (every backend's fake)."""
    M, K = x.shape
    u_dtype = torch.promote_types(x.dtype, torch.float32)
    return (
        x.new_empty(M, weight.shape[0]),
        x.new_empty(M, lora_A.shape[0], dtype=u_dtype),
        x.new_empty(keep_bits_shape(M, K, dropout_p), dtype=torch.uint8),
    )


def backward_fake(
    grad_y, x, weight, lora_A, lora_B, scaling, dropout_p, seed, u, keep_bits, nx, nl, ns, nb
):
    """The backward op's outputs as the contract shapes them (every backend's fake)."""

    def maybe(flag, shape, dtype):
        return x.new_empty(shape if flag else (0,), dtype=dtype)

    M, K = x.shape
    N, R = lora_B.shape
    return (
        maybe(nx, (M, K), x.dtype),
        maybe(nl, (R, K), lora_A.dtype),
        maybe(nl, (N, R), lora_B.dtype),
        maybe(ns, (), scaling.dtype),
        maybe(nb, (N,), x.dtype),
    )


def register_lora_autograd(forward_op, backward_op) -> None:
    """Make `forward_op` differentiable through `backward_op` (schemas in docs/backends.md)."""

    def backward(ctx, grad_y, grad_u, grad_keep_bits):
        x, weight, lora_A, lora_B, scaling, seed, u, keep_bits = ctx.saved_tensors
        need = ctx.needs_input_grad
        _check_first_order(grad_y, x, lora_A, lora_B, scaling)
        need_lora = need[_A] or need[_B]
        grad_x, grad_A, grad_B, grad_scaling, grad_bias = backward_op(
            grad_y,
            x,
            weight,
            lora_A,
            lora_B,
            scaling,
            ctx.dropout_p,
            seed,
            u,
            keep_bits,
            need[_X],
            need_lora,
            need[_SCALING],
            need[_BIAS],
        )
        return (
            grad_x if need[_X] else None,
            None,  # weight is frozen: lora_linear routes a trainable weight elsewhere
            grad_bias if need[_BIAS] else None,
            grad_A if need[_A] else None,
            grad_B if need[_B] else None,
            grad_scaling if need[_SCALING] else None,
            None,
            None,
        )

    torch.library.register_autograd(forward_op, backward, setup_context=_setup_context)
