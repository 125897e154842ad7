"""DoRA over a 4-bit base weight (QDoRA): `qdora_linear`.

    Y = (m/n) * (X W^T + s X A^T B^T) + b        (with dropout: peft's form, `dora_op`)
    W = dequantize(packed weight, quant state),  n = ||W + s B A|| per row, detached

`dora_linear` sends a bitsandbytes `Params4bit` weight here. This is `dora_op`'s math
on `qlora_op`'s workspace rule: each call dequantizes W into the workspace and runs
`dora_op.dora_forward` on it; backward dequantizes again and runs
`dora_op.dora_backward`. Both are called below autograd, from the two ops of this file
(`lora_kernels::qdora_forward` / `qdora_backward`, one autograd registration), so the
dense W is never saved: backward keeps what DoRA keeps on a dense weight (x, U, the
keep bits, and Y without dropout or P with it) with the packed weight and its
quant-state tensors in place of W.

Numerics, as peft's 4-bit DoRA layer: n is taken of W dequantized to
`quant_state.dtype` (peft's `dequantize_module_weight`), accumulated in float32; the
products use W dequantized as `qlora_op` does (forward straight to the compute dtype,
dX through `quant_state.dtype`). ||W_n||^2 is cached as for a dense weight
(`dora.WeightNormCache`), keyed on the `Params4bit` itself: a merge, an unmerge or a
load puts a new one in place, or writes it in place (its version counter). W A^T needs
the dense W, so the norm costs one more dequantize per forward.
"""

from __future__ import annotations

import math

import torch

from . import backends, contract, dora, dora_op, quant4bit, reference
from .qlora_op import (
    _backward_weight,
    _dequant_backend,
    _forward_weight,
    _packed,
    check_4bit_call,
    workspace,
)


def stored_dense_weight(w: quant4bit.Packed4bit, dequant: str) -> torch.Tensor:
    """W in `quant_state.dtype` (as peft's norm sees it), in the workspace."""
    out = workspace(w.shape, w.dtype, w.packed.device)
    return quant4bit.dequantize_into(w, out, dequant)


# ---------------------------------------------------------------------------------------
# The two ops and their autograd
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("lora_kernels::qdora_forward", mutates_args=())
def qdora_forward(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax_code: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scaling: torch.Tensor,
    seed: torch.Tensor,
    blocksize: int,
    blocksize2: int,
    N: int,
    weight_dtype: torch.dtype,
    quant_type: str,
    dropout_p: float,
    backend: str,
    dequant: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dora_op.dora_forward`'s (Y, U, keep_bits, P) over W dequantized into the workspace."""
    w = _packed(
        packed, absmax, code, absmax_code, absmax2, offset, blocksize, blocksize2, N,
        x.shape[1], weight_dtype, quant_type,
    )  # fmt: skip
    weight = _forward_weight(w, x.dtype, dequant)
    return dora_op.dora_forward(
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, backend
    )


@qdora_forward.register_fake
def _(
    x, packed, absmax, code, absmax_code, absmax2, offset, bias, lora_A, lora_B, magnitude,
    weight_norm, scaling, seed, blocksize, blocksize2, N, weight_dtype, quant_type, dropout_p,
    backend, dequant,
):  # fmt: skip
    # dora_forward's own fake shapes the outputs.
    weight = x.new_empty(N, x.shape[1])
    return dora_op.dora_forward(
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, backend
    )


@torch.library.custom_op("lora_kernels::qdora_backward", mutates_args=())
def qdora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax_code: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scaling: torch.Tensor,
    seed: torch.Tensor,
    u: torch.Tensor,
    keep_bits: torch.Tensor,
    kept: torch.Tensor,
    blocksize: int,
    blocksize2: int,
    N: int,
    weight_dtype: torch.dtype,
    quant_type: str,
    dropout_p: float,
    backend: str,
    dequant: str,
    need_grad_x: bool,
    need_grad_lora: bool,
    need_grad_magnitude: bool,
    need_grad_scaling: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dora_op.dora_backward` over W dequantized again, as the forward's W was formed
    for what the forward computed: dX reads W as `MatMul4Bit.backward` does, dm without
    dropout reads the forward's W (Z at the rows where m = 0, which Y does not hold; with
    dropout dm needs no W). W is dequantized only for what reads it."""
    w = _packed(
        packed, absmax, code, absmax_code, absmax2, offset, blocksize, blocksize2, N,
        x.shape[1], weight_dtype, quant_type,
    )  # fmt: skip
    magnitude_reads_w = need_grad_magnitude and dropout_p == 0.0
    # Both W when they differ (a compute dtype other than quant_state.dtype): dm apart.
    magnitude_apart = magnitude_reads_w and need_grad_x and weight_dtype != x.dtype
    if need_grad_x:
        weight = _backward_weight(w, x.dtype, dequant)
    elif magnitude_reads_w:
        weight = _forward_weight(w, x.dtype, dequant)
    else:
        weight = workspace(w.shape, x.dtype, x.device)
    grads = dora_op.dora_backward(
        grad_y, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p,
        seed, u, keep_bits, kept, backend, need_grad_x, need_grad_lora,
        need_grad_magnitude and not magnitude_apart, need_grad_scaling, need_grad_bias,
    )  # fmt: skip
    if not magnitude_apart:
        return grads
    weight = _forward_weight(w, x.dtype, dequant)
    grad_m = dora_op.dora_backward(
        grad_y, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p,
        seed, u, keep_bits, kept, backend, False, False, True, False, False,
    )[3]  # fmt: skip
    return (*grads[:3], grad_m, *grads[4:])


@qdora_backward.register_fake
def _(
    grad_y, x, packed, absmax, code, absmax_code, absmax2, offset, bias, lora_A, lora_B,
    magnitude, weight_norm, scaling, seed, u, keep_bits, kept, blocksize, blocksize2, N,
    weight_dtype, quant_type, dropout_p, backend, dequant, nx, nl, nm, ns, nb,
):  # fmt: skip
    weight = x.new_empty(N, x.shape[1])
    return dora_op.dora_backward(
        grad_y, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p,
        seed, u, keep_bits, kept, backend, nx, nl, nm, ns, nb,
    )  # fmt: skip


# Positions of qdora_forward's inputs.
_X, _BIAS, _LORA_A, _LORA_B, _MAGNITUDE, _WEIGHT_NORM, _SCALING, _SEED = 0, 7, 8, 9, 10, 11, 12, 13
_N_INPUTS = 22
_STATE = slice(1, 7)  # packed, absmax, code, absmax_code, absmax2, offset
_META = slice(14, 22)  # blocksize, blocksize2, N, weight_dtype, quant_type, p, backend, dequant


def _setup_context(ctx, inputs, output):
    y, u, keep_bits, dropped_base = output
    p = inputs[_META][5]
    # As dora_op: without dropout the output itself, with dropout P.
    kept = y if p == 0.0 else dropped_base
    operands = tuple(
        inputs[i] for i in (_X, _BIAS, _LORA_A, _LORA_B, _MAGNITUDE, _WEIGHT_NORM, _SCALING, _SEED)
    )
    state = inputs[_STATE]
    # Optional tensors (the bias; quant-state tensors without double quantization) may be
    # None, which save_for_backward keeps as None.
    ctx.save_for_backward(*operands, u, keep_bits, kept, *state)
    ctx.meta = inputs[_META]
    ctx.mark_non_differentiable(u, keep_bits, dropped_base)


def _backward(ctx, grad_y, grad_u, grad_keep_bits, grad_dropped_base):
    x, bias, lora_A, lora_B, magnitude, weight_norm, scaling, seed, u, keep_bits, kept, *state = (
        ctx.saved_tensors
    )
    need = ctx.needs_input_grad
    differentiable = [t for t in (grad_y, x, lora_A, lora_B, magnitude, scaling) if t.requires_grad]
    second_order = torch.is_grad_enabled() and bool(differentiable)
    with torch.no_grad():
        grad_x, grad_A, grad_B, grad_m, grad_scaling, grad_bias = qdora_backward(
            grad_y, x, *state, bias, lora_A, lora_B, magnitude, weight_norm, scaling, seed, u,
            keep_bits, kept, *ctx.meta, need[_X], need[_LORA_A] or need[_LORA_B],
            need[_MAGNITUDE], need[_SCALING], need[_BIAS],
        )  # fmt: skip
    grads = [None] * _N_INPUTS
    grads[_X] = grad_x if need[_X] else None
    grads[_BIAS] = grad_bias if need[_BIAS] else None
    grads[_LORA_A] = grad_A if need[_LORA_A] else None
    grads[_LORA_B] = grad_B if need[_LORA_B] else None
    grads[_MAGNITUDE] = grad_m if need[_MAGNITUDE] else None
    grads[_SCALING] = grad_scaling if need[_SCALING] else None
    grads = tuple(grads)
    return contract._first_order_only(grads, differentiable) if second_order else grads


qdora_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lora_kernels::qdora_weight_row_norm", mutates_args=())
def _weight_row_norm_op(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax_code: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    blocksize: int,
    blocksize2: int,
    N: int,
    weight_dtype: torch.dtype,
    quant_type: str,
    dequant: str,
) -> torch.Tensor:
    w = _packed(
        packed, absmax, code, absmax_code, absmax2, offset, blocksize, blocksize2, N,
        lora_A.shape[1], weight_dtype, quant_type,
    )  # fmt: skip
    return dora.weight_row_norm(stored_dense_weight(w, dequant), lora_A, lora_B, scaling)


@_weight_row_norm_op.register_fake
def _(packed, absmax, code, absmax_code, absmax2, offset, lora_A, lora_B, scaling, *meta):
    return lora_A.new_empty(meta[2], dtype=contract.accumulation_dtype(meta[3]))


def weight_row_norm(w, weight, lora_A, lora_B, scaling, dequant, norm_cache) -> torch.Tensor:
    """n = ||W + s B A|| [N] of the 4-bit `weight` (read into `w`), W in
    `quant_state.dtype`; ||W_n||^2 kept in `norm_cache` (keyed on `weight`). Traced by
    torch.compile: one opaque op, without the cache (as `dora.weight_row_norm_op`)."""
    if torch.compiler.is_compiling():
        return _weight_row_norm_op(
            w.packed, w.absmax, w.code, w.absmax_code, w.absmax2, w.offset, lora_A.detach(),
            lora_B.detach(), scaling.detach(), w.blocksize, w.blocksize2, w.shape[0], w.dtype,
            w.quant_type, dequant,
        )  # fmt: skip
    dense = stored_dense_weight(w, dequant)
    return dora.weight_row_norm(dense, lora_A, lora_B, scaling, norm_cache, stored=weight)


# ---------------------------------------------------------------------------------------
# The public entry point (called by dora_linear)
# ---------------------------------------------------------------------------------------


def qdora_linear(
    x, weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training, backend, norm_cache
):
    """`dora_linear` for a bitsandbytes 4-bit `weight` (a `Params4bit` with its
    quant_state): same arguments and result; x's dtype is the compute dtype."""
    from . import ops

    if isinstance(x, torch.Tensor) and x.dtype in ops._FLOAT_DTYPES:
        x, bias, lora_A, lora_B, magnitude = ops.autocast_operands(
            x, bias, lora_A, lora_B, magnitude
        )
    w, p = check_4bit_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend)
    N, K = w.shape
    ops.check_dora_arguments(x, N, lora_A, magnitude, norm_cache)
    x2d = x.reshape(math.prod(x.shape[:-1]), K)
    acc = contract.accumulation_dtype(x.dtype)
    # The plain op's seed: the same draw, so the same mask for the same seed and shape.
    seed = ops.call_seed(p, x.device)
    name = backends.resolve_backend(x.device.type, backend)
    dequant = _dequant_backend(name, x.device.type)
    if isinstance(scaling, torch.Tensor):
        scaling_t = scaling.reshape(()).to(acc)
    else:
        scaling_t = torch.full((), float(scaling), dtype=acc, device=x.device)

    with ops._autocast_disabled(x.device.type):
        weight_norm = weight_row_norm(w, weight, lora_A, lora_B, scaling_t, dequant, norm_cache)
        if ops.composition_needed():
            # torch.func and forward-mode AD: the reference's composition over a dense
            # copy of W (no fused op, hence no workspace rule to keep).
            dense = quant4bit.dequantize_into(
                w, torch.empty((N, K), dtype=x.dtype, device=x.device), dequant
            )
            y = reference.dora_linear_reference(
                x2d, dense, bias, lora_A, lora_B, magnitude, scaling, p, seed=seed,
                weight_norm=weight_norm,
            )  # fmt: skip
            return y.reshape(*x.shape[:-1], N)
        y, _, _, _ = qdora_forward(
            x2d, w.packed, w.absmax, w.code, w.absmax_code, w.absmax2, w.offset, bias, lora_A,
            lora_B, magnitude, weight_norm, scaling_t, seed, w.blocksize, w.blocksize2, N,
            w.dtype, w.quant_type, p, name, dequant,
        )  # fmt: skip
    return y.reshape(*x.shape[:-1], N)
