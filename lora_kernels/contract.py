"""The Python side of the op contract (docs/backends.md) that every backend meets.

A backend is two `torch.library` ops, `<backend>_forward` and `<backend>_backward`.
This module holds what they share: the accumulation dtype, the shape of the packed
keep mask, the argument checks of the ops, their fake (meta) implementations and the
one autograd formula attached to every forward op. The math itself is in
`reference.py` (`lora_linear_reference`, `lora_linear_backward_reference`).

What backward keeps (docs/design.md, "What backward may keep"): x itself, U [M, R]
(the "cpu" backend without dropout returns it empty and recomputes it in backward),
the seed and, with dropout, the keep mask packed one bit per element (`keep_bits`,
so backward reads the mask instead of generating it again). The frozen weight and the
adapters are parameters, not activations. A backend's backward op gets flags for the
gradients autograd asks for, so that a frozen first layer skips the dX GEMM and a
frozen adapter skips dA and dB.
"""

from __future__ import annotations

import torch

# Positions of the forward op's inputs (docs/backends.md).
X, WEIGHT, BIAS, LORA_A, LORA_B, SCALING, DROPOUT_P, SEED = range(8)

STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every product accumulates in, U and the scaling are held in: float32
    for 16-bit and float32 x, float64 for float64 x."""
    return torch.promote_types(dtype, torch.float32)


def keep_bits_shape(M: int, K: int, dropout_p: float) -> tuple[int, ...]:
    """The shape of the forward's `keep_bits`: [M, ceil(K/8)] with dropout, else [0]."""
    return (M, (K + 7) // 8) if dropout_p > 0.0 else (0,)


# ---------------------------------------------------------------------------------------
# Argument checks of the backend ops (the C++ twin: check_common, csrc/common/op_common.cpp)
# ---------------------------------------------------------------------------------------


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def check_tensor(name: str, t, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    """`t` is a tensor of exactly `shape`, one of `dtypes`, on `device`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        expected = "[" + ", ".join(str(d) for d in shape) + "]"
        raise ValueError(f"{name} must have shape {expected}, got {shape_str(t)}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on x's device {device}, got {t.device}")


def check_op_inputs(
    backend: str, dtypes: tuple, x, weight, lora_A, lora_B, scaling, dropout_p, seed
) -> None:
    """Checks shared by a backend's forward and backward; the sizes come from x, weight
    and lora_A. `dtypes` are the x dtypes the backend accepts."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {shape_str(x)}")
    if x.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        hint = " (the 'torch' backend accepts float64)" if torch.float64 not in dtypes else ""
        raise TypeError(f"x must have dtype {names} for the {backend} backend, got {x.dtype}{hint}")
    device = x.device
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [N, K], got {weight!r:.80}")
    if not isinstance(lora_A, torch.Tensor) or lora_A.dim() != 2:
        raise ValueError(f"lora_A must be a 2-D tensor [R, K], got {lora_A!r:.80}")
    K = x.shape[1]
    N = weight.shape[0]
    R = lora_A.shape[0]
    check_tensor("weight", weight, (N, K), (x.dtype,), device)
    check_tensor("lora_A", lora_A, (R, K), tuple({x.dtype, torch.float32}), device)
    check_tensor("lora_B", lora_B, (N, R), (lora_A.dtype,), device)
    check_tensor("scaling", scaling, (), (accumulation_dtype(x.dtype),), device)
    check_tensor("seed", seed, (), (torch.int64,), device)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def check_bias(bias, x, weight) -> None:
    """bias is None or [N] in x's dtype on x's device."""
    if bias is not None:
        check_tensor("bias", bias, (weight.shape[0],), (x.dtype,), x.device)


def check_backward_inputs(x, weight, lora_A, grad_y, u, keep_bits, dropout_p) -> None:
    """The backward op's own inputs, after `check_op_inputs`: grad_y [M, N] in x's dtype,
    u [M, R] in the accumulation dtype, keep_bits as the forward shaped it (or [0])."""
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    device = x.device
    check_tensor("grad_y", grad_y, (M, N), (x.dtype,), device)
    check_tensor("u", u, (M, R), (accumulation_dtype(x.dtype),), device)
    if dropout_p > 0.0 and tuple(keep_bits.shape) != (0,):
        bits_shape = keep_bits_shape(M, K, dropout_p)
        check_tensor("keep_bits", keep_bits, bits_shape, (torch.uint8,), device)


# ---------------------------------------------------------------------------------------
# Fakes and the autograd formula, shared by every backend's ops
# ---------------------------------------------------------------------------------------


def forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """The forward op's outputs as the contract shapes them (every backend's fake)."""
    M, K = x.shape
    return (
        x.new_empty(M, weight.shape[0]),
        x.new_empty(M, lora_A.shape[0], dtype=accumulation_dtype(x.dtype)),
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


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed = inputs
    _, u, keep_bits = output
    ctx.save_for_backward(x, weight, lora_A, lora_B, scaling, seed, u, keep_bits)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(u, keep_bits)


_DOUBLE_BACKWARD = (
    "lora_kernels: double backward (a gradient of a gradient) through lora_linear is not "
    "supported; use lora_kernels.reference.lora_linear_reference for higher-order derivatives"
)


class _FirstOrderOnly(torch.autograd.Function):
    """Passes the first-order gradients through and raises if a gradient flows back
    into them (as `torch.autograd.function.once_differentiable` does, but connected to
    the op's inputs, so `torch.autograd.grad(..., inputs)` reaches the error)."""

    @staticmethod
    def forward(ctx, count, *tensors):
        return tuple(g.view_as(g) for g in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_DOUBLE_BACKWARD)


def _first_order_only(grads: tuple, inputs: tuple) -> tuple:
    """The gradients, made to raise only if a second-order gradient flows through them:
    under create_graph=True the first-order gradients are still returned."""
    present = [g for g in grads if g is not None]
    if not present:
        return grads
    wrapped = iter(_FirstOrderOnly.apply(len(present), *present, *inputs))
    return tuple(None if g is None else next(wrapped) for g in grads)


def register_lora_autograd(forward_op, backward_op) -> None:
    """Make `forward_op` differentiable through `backward_op` (schemas in docs/backends.md)."""

    def backward(ctx, grad_y, grad_u, grad_keep_bits):
        x, weight, lora_A, lora_B, scaling, seed, u, keep_bits = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_lora = need[LORA_A] or need[LORA_B]
        differentiable = [t for t in (grad_y, x, lora_A, lora_B, scaling) if t.requires_grad]
        second_order = torch.is_grad_enabled() and bool(differentiable)
        with torch.no_grad():
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
                need[X],
                need_lora,
                need[SCALING],
                need[BIAS],
            )
        grads = (
            grad_x if need[X] else None,
            None,  # weight is frozen: lora_linear routes a trainable weight elsewhere
            grad_bias if need[BIAS] else None,
            grad_A if need[LORA_A] else None,
            grad_B if need[LORA_B] else None,
            grad_scaling if need[SCALING] else None,
            None,
            None,
        )
        return _first_order_only(grads, differentiable) if second_order else grads

    torch.library.register_autograd(forward_op, backward, setup_context=_setup_context)
