"""The autograd formula of the op, attached once to every backend's forward op.

What backward keeps (design notes, "What backward may keep"): x itself, U [M, R] and
the seed. The frozen weight and the adapters are parameters, not activations. A
backend's backward op gets flags for the gradients autograd asks for, so that a
frozen first layer skips the dX GEMM and a frozen adapter skips dA and dB.
"""

from __future__ import annotations

import torch

# Positions of the forward op's inputs (docs/backends.md).
_X, _WEIGHT, _BIAS, _A, _B, _SCALING, _P, _SEED = range(8)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, u = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, scaling, seed, u)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(u)


def _check_first_order(*grads: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(g.requires_grad for g in grads):
        raise RuntimeError(
            "lora_kernels: double backward (a gradient of a gradient) through lora_linear "
            "is not supported; use lora_kernels.reference.lora_linear_reference for "
            "higher-order derivatives"
        )


def backward_fake(grad_y, x, weight, lora_A, lora_B, scaling, dropout_p, seed, u, nx, nl, ns, nb):
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

    def backward(ctx, grad_y, grad_u):
        x, weight, lora_A, lora_B, scaling, seed, u = ctx.saved_tensors
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
