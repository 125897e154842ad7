"""DoRA on every backend: that backend's fused plain ops plus a few ATen ops.

Two `torch.library` ops, `lora_kernels::dora_forward` and `lora_kernels::dora_backward`,
with one fake each and one autograd formula (first-order only, as `contract.py`). They
take the backend's name and call its `forward_op` / `backward_op`
(`backends.backend_ops`) directly, below the plain op's autograd. The math is peft's
(`reference.dora_linear_reference`), with g = m/n [N] (n detached, `dora.weight_row_norm`)
and s, U, D as in `reference.py`:

Without dropout (p = 0 or eval), g scales the rows of the whole product, so the plain
op on W_g = diag(g) W and B_g = diag(g) B is DoRA itself: one fused call, no epilogue.
Scaling W [N, K] costs less than scaling Y or dY [M, N] whenever M > K, and dY reaches
the backward op unrounded:

    Y  = X W_g^T + b + s U B_g^T = g * (X W^T + s U B^T) + b
    backward_op(dY, W_g, B_g) gives dY W_g + s (dY B_g) A = dX, dA, dB_g = s dY^T U, ds, db
    dB = g * dB_g;  dm = sum_rows dY * Z / n = sum_rows dY * (Y - b) / m   (Y - b = g Z)

Backward keeps x, U (as the backend returns it: nothing from "cpu"), and Y itself (the
op's output, which the next op usually keeps anyway), from which Z is read back; W_g and
B_g are formed again. Where m = 0 (g = 0) Y holds nothing of Z; those columns of Z are
recomputed by a skinny product over their rows of W and B only.

With dropout in training, peft's form Y = X W^T + b + (g - 1) * D(X) W^T + g * s U B^T
is one fused plain call with B_g = diag(g) B (it gives X W^T + b + g * s U B^T, U and
the keep bits) plus P = (X * keep) W^T, the dropped base product, rounded to x's dtype
as the reference rounds it:

    Y  = y_plain + (g - 1) / (1 - p) * P
    backward_op(dY, B_g) gives dY W + D(s (dY B_g) A), dA, dB_g = s dY^T U, ds, db
    dX = that + keep * (dY (diag((g - 1) / (1 - p)) W))
    dB = g * dB_g;  dm = (sum_rows dY * P / (1 - p) + sum_R (B * dB_g)) / n

Backward keeps x, U, the keep bits (1 bit per element of x) and P [M, N] in x's dtype.
Four [M, N, K] products in all (two forward, two backward): twice the frozen layer's.

A backend with DoRA passes of its own (`backends.dora_ops`: the triton backend) computes
the same Y, U, bits and P, and the same backward terms, in its kernels, given g and
c = (g - 1) / (1 - p): g in the forward GEMM's epilogue and on the B and dY tiles of
backward in place of W_g and B_g, both products of the forward (and of dX) from one
pass over W with dropout, and the column sums sum_rows dY * Y (or dY * P) and sum_rows
dY in the dY pass. dm and dB are then formed here by the formulas above, and backward
keeps what it keeps on every backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends, contract, reference
from .contract import accumulation_dtype

# Positions of dora_forward's inputs.
X, WEIGHT, BIAS, LORA_A, LORA_B, MAGNITUDE, WEIGHT_NORM, SCALING = range(8)


def _row_scale(magnitude: torch.Tensor, weight_norm: torch.Tensor, acc) -> torch.Tensor:
    """g = m / n [N] in the accumulation dtype."""
    return magnitude.to(acc) / weight_norm.to(acc)


# Row b of a table: the 8 keep flags of byte value b as 0 and 1 in one dtype, bit i at
# column i (`reference.pack_keep_mask`'s layout); per (device, dtype), made once.
_KEEP_TABLES: dict = {}


def keep_factors(
    keep_bits: torch.Tensor, K: int, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """`reference.unpack_keep_mask` as 0 and 1 in `dtype`, by a table lookup per byte:
    [M, ceil(K/8)] uint8 -> [M, K], written into `out` (M * ceil(K/8) * 8 elements,
    contiguous) if given. A product with it applies the mask in one pass (a bool operand
    would first be cast to a full-size temporary)."""
    key = (keep_bits.device, dtype)
    table = _KEEP_TABLES.get(key)
    if table is None:
        bits = torch.tensor(reference._BIT_WEIGHTS, dtype=torch.uint8)
        flags = (torch.arange(256, dtype=torch.uint8)[:, None] & bits) != 0
        table = _KEEP_TABLES[key] = flags.to(dtype).to(keep_bits.device)
    M, K8 = keep_bits.shape
    if out is not None:
        out = out.view(-1, 8)
    factors = torch.index_select(table, 0, keep_bits.reshape(-1).int(), out=out)
    return factors.view(M, K8 * 8)[:, :K]


# Rows per block of the masked products on CPUs: a block's keep factors and X * keep stay
# in cache between the mask and the GEMM, and one small buffer serves every block in
# place of an [M, K] temporary (512 measured fastest of 256-1024 at K = N = 1024).
_KEEP_BLOCK_ROWS = 512


def mask_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype the keep mask is applied in: like's own on the CPU, where a product with
    a bool operand first casts it to a full-size temporary; bool elsewhere, where the
    cast happens in registers and the mask costs 1 byte per element, not 2 or 4."""
    return like.dtype if like.device.type == "cpu" else torch.bool


def _keep_factor_blocks(keep_bits, seed, M: int, K: int, p: float, like: torch.Tensor):
    """(rows, the plain op's keep mask at those rows as 0 and 1 in `mask_dtype(like)`)
    over blocks of rows covering [0, M): from the keep bits, or the seed's mask when a
    backend returned none. One block of all rows off the CPU."""
    dtype = mask_dtype(like)
    if keep_bits.dim() != 2:
        yield slice(0, M), reference.dropout_keep_mask(seed, M, K, p, like.device).to(dtype)
        return
    rows = _KEEP_BLOCK_ROWS if like.device.type == "cpu" else max(M, 1)
    buffer = like.new_empty(min(rows, M) * keep_bits.shape[1] * 8, dtype=dtype)
    for start in range(0, M, rows):
        block = keep_bits[start : start + rows]
        factors = keep_factors(block, K, dtype, buffer[: block.numel() * 8])
        yield slice(start, start + rows), factors


def _masked(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """t * keep (exact: t * 1 or t * 0), in keep's buffer when it has t's dtype."""
    return keep.mul_(t) if keep.dtype == t.dtype else t * keep


def _scaled_rows(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """diag(g) t in t's dtype (W_g, B_g), the product in g's dtype and rounded once."""
    return torch.mul(t, g[:, None], out=torch.empty_like(t))


@torch.library.custom_op("lora_kernels::dora_forward", mutates_args=())
def dora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scaling: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Y [M, N], U, keep_bits, P) for x [M, K]: U and keep_bits as the backend's forward
    returns them, P [M, N] the dropped base product with dropout, else empty."""
    acc = accumulation_dtype(x.dtype)
    g = _row_scale(magnitude, weight_norm, acc)
    fused = backends.dora_ops(backend)
    if fused is not None:
        # The same Y, U, bits and P, from the backend's own kernels.
        base_scale = (g - 1) * reference.dropout_scale(dropout_p) if dropout_p > 0.0 else None
        return fused[0](x, weight, bias, lora_A, lora_B, g, base_scale, scaling, dropout_p, seed)
    forward_op, _ = backends.backend_ops(backend)
    if dropout_p == 0.0:
        y, u, keep_bits = forward_op(
            x, _scaled_rows(weight, g), bias, lora_A, _scaled_rows(lora_B, g), scaling, 0.0, seed
        )
        return y, u, keep_bits, x.new_empty(0)
    y, u, keep_bits = forward_op(
        x, weight, bias, lora_A, _scaled_rows(lora_B, g), scaling, dropout_p, seed
    )
    M, K = x.shape
    dropped_base = x.new_empty(M, weight.shape[0])  # P  [M, N]
    base_scale = (g - 1) * reference.dropout_scale(dropout_p)
    # By blocks of rows on the CPU: a block of X * keep goes from its product to the GEMM
    # in cache, and P's block is added to Y's while it is still there.
    for rows, keep in _keep_factor_blocks(keep_bits, seed, M, K, dropout_p, x):
        torch.mm(_masked(x[rows], keep), weight.t(), out=dropped_base[rows])
        y[rows].addcmul_(dropped_base[rows], base_scale)
    return y, u, keep_bits, dropped_base


@dora_forward.register_fake
def _forward_fake(
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed, backend
):
    # The backend's own fake shapes U (the "cpu" backend's is empty without dropout).
    forward_op, _ = backends.backend_ops(backend)
    y, u, keep_bits = forward_op(x, weight, None, lora_A, lora_B, scaling, dropout_p, seed)
    dropped_base = x.new_empty(y.shape if dropout_p > 0.0 else (0,))
    return y, u, keep_bits, dropped_base


@torch.library.custom_op("lora_kernels::dora_backward", mutates_args=())
def dora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    weight_norm: torch.Tensor,
    scaling: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
    u: torch.Tensor,
    keep_bits: torch.Tensor,
    kept: torch.Tensor,
    backend: str,
    need_grad_x: bool,
    need_grad_lora: bool,
    need_grad_magnitude: bool,
    need_grad_scaling: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_A, grad_B, grad_magnitude, grad_scaling, grad_bias); `kept` is Y
    without dropout, P with it. A gradient not asked for is an empty tensor."""
    fused = backends.dora_ops(backend)
    if fused is not None:
        return _fused_backward(
            fused[1], grad_y, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling,
            dropout_p, seed, u, keep_bits, kept, need_grad_x, need_grad_lora,
            need_grad_magnitude, need_grad_scaling, need_grad_bias,
        )  # fmt: skip
    _, backward_op = backends.backend_ops(backend)
    acc = accumulation_dtype(x.dtype)
    g = _row_scale(magnitude, weight_norm, acc)
    need_plain = need_grad_x or need_grad_lora or need_grad_scaling
    # A custom op's outputs may not alias one another: an empty tensor each.
    grad_x, grad_A, grad_B, grad_m, grad_scaling, grad_bias = (x.new_empty(0) for _ in range(6))
    if dropout_p == 0.0:
        if need_plain or need_grad_bias:
            grad_x, grad_A, grad_B_g, grad_scaling, grad_bias = backward_op(
                grad_y, x, _scaled_rows(weight, g), lora_A, _scaled_rows(lora_B, g), scaling,
                0.0, seed, u, keep_bits, need_grad_x, need_grad_lora, need_grad_scaling,
                need_grad_bias,
            )  # fmt: skip
            if need_grad_lora:
                grad_B = (g[:, None] * grad_B_g.to(acc)).to(lora_B.dtype)
        if need_grad_magnitude:
            grad_m = _magnitude_grad_from_output(
                grad_y, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, u, kept
            )
        return grad_x, grad_A, grad_B, grad_m, grad_scaling, grad_bias

    M, K = x.shape
    need_lora = need_grad_lora or need_grad_magnitude
    if need_plain or need_lora or need_grad_bias:
        grad_x, grad_A, grad_B_g, grad_scaling, grad_bias = backward_op(
            grad_y, x, weight, lora_A, _scaled_rows(lora_B, g), scaling, dropout_p, seed, u,
            keep_bits, need_grad_x, need_lora, need_grad_scaling, need_grad_bias,
        )  # fmt: skip
    drop_scale = reference.dropout_scale(dropout_p)
    if need_grad_x:
        # The (g - 1) D(X) W^T term's gradient: one more product with W, masked; by
        # blocks of rows on the CPU, each block masked into dX while in cache.
        base_weight = _scaled_rows(weight, (g - 1) * drop_scale)
        for rows, keep in _keep_factor_blocks(keep_bits, seed, M, K, dropout_p, grad_x):
            grad_x[rows].addcmul_(grad_y[rows] @ base_weight, keep)
    if need_grad_magnitude:
        base_dot = _column_dot(grad_y, kept, acc)
        grad_m = _magnitude_grad_dropped(
            base_dot, lora_B, grad_B_g, magnitude, weight_norm, dropout_p
        )
    if need_grad_lora:
        grad_B = (g[:, None] * grad_B_g.to(acc)).to(lora_B.dtype)
    else:
        grad_A = x.new_empty(0)
    return grad_x, grad_A, grad_B, grad_m, grad_scaling, grad_bias


def _fused_backward(
    fused_backward, grad_y, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling,
    dropout_p, seed, u, keep_bits, kept, need_grad_x, need_grad_lora, need_grad_magnitude,
    need_grad_scaling, need_grad_bias,
):  # fmt: skip
    """dora_backward on a backend with DoRA passes of its own (`backends.dora_ops`): g and
    c = (g - 1) / (1 - p) enter its kernels, which also return the column sums of
    dY * kept (and of dY) that dm is formed from here, by the formulas above."""
    acc = accumulation_dtype(x.dtype)
    g = _row_scale(magnitude, weight_norm, acc)
    has_dropout = dropout_p > 0.0
    base_scale = (g - 1) * reference.dropout_scale(dropout_p) if has_dropout else None
    # With dropout dm needs dB_g (its LoRA part), without it only the column sums.
    need_lora = need_grad_lora or (need_grad_magnitude and has_dropout)
    need_dy_sum = need_grad_magnitude and not has_dropout and bias is not None
    grad_x, grad_A, grad_B_g, grad_scaling, grad_bias, kept_dot, grad_y_sum = fused_backward(
        grad_y, x, weight, lora_A, lora_B, g, base_scale, scaling, dropout_p, seed, u,
        keep_bits, kept, need_grad_x, need_lora, need_grad_scaling, need_grad_bias,
        need_grad_magnitude, need_dy_sum,
    )  # fmt: skip
    grad_m = x.new_empty(0)
    if need_grad_magnitude and has_dropout:
        grad_m = _magnitude_grad_dropped(
            kept_dot, lora_B, grad_B_g, magnitude, weight_norm, dropout_p
        )
    elif need_grad_magnitude:
        grad_m = _magnitude_grad_from_sums(
            kept_dot, grad_y_sum, grad_y, x, weight, bias, lora_A, lora_B, magnitude,
            weight_norm, scaling, u,
        )  # fmt: skip
    grad_B = x.new_empty(0)
    if need_grad_lora:
        grad_B = (g[:, None] * grad_B_g.to(acc)).to(lora_B.dtype)
    else:
        grad_A = x.new_empty(0)
    return grad_x, grad_A, grad_B, grad_m, grad_scaling, grad_bias


def _magnitude_grad_dropped(base_dot, lora_B, grad_B_g, magnitude, weight_norm, dropout_p):
    """dm with dropout, from base_dot = sum_rows dY * P [N] and dB_g = s dY^T U:
    (base_dot / (1 - p) + sum_R B * dB_g) / n, for sum_rows dY * s U B^T = sum_R B * dB_g."""
    acc = base_dot.dtype
    lora_part = (lora_B.to(acc) * grad_B_g.to(acc)).sum(1)
    base_part = base_dot * reference.dropout_scale(dropout_p)
    return ((base_part + lora_part) / weight_norm.to(acc)).to(magnitude.dtype)


# Rows per block of `_column_dot` on CPUs: the [256, N] partial sum stays in cache.
_COLUMN_DOT_ROWS = 256


def _column_dot(a: torch.Tensor, b: torch.Tensor, acc, *, with_sum: bool = False):
    """sum over rows of a * b [N], for a, b [M, N], in the accumulation dtype; with
    `with_sum`, (that, the sum over rows of a).

    On CPUs, blocks of rows are multiplied and added into a [256, N] partial sum, summed
    at the end: one pass over a and b, with no [M, N] product written and read back
    (half the time of `(a * b).sum(0)` or linalg.vecdot), and a's block summed while in
    cache. Elsewhere a product and a sum.
    """
    M, N = a.shape
    rows = _COLUMN_DOT_ROWS
    if a.device.type != "cpu" or M < 2 * rows:
        dot = (a.to(acc) * b.to(acc)).sum(0)
        return (dot, a.sum(0, dtype=acc)) if with_sum else dot
    partial = torch.zeros(rows, N, dtype=acc, device=a.device)
    partial_a = torch.zeros(rows, N, dtype=acc, device=a.device) if with_sum else None
    for start in range(0, M, rows):
        a_rows, b_rows = a[start : start + rows], b[start : start + rows]
        partial[: a_rows.shape[0]].addcmul_(a_rows, b_rows)
        if with_sum:
            partial_a[: a_rows.shape[0]].add_(a_rows)
    dot = partial.sum(0)
    return (dot, partial_a.sum(0)) if with_sum else dot


def _magnitude_grad_from_output(
    grad_y, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, u, y
) -> torch.Tensor:
    """dm = sum_rows dY * Z / n without dropout, Z read back from Y = g * Z + b."""
    acc = accumulation_dtype(x.dtype)
    if bias is None:
        y_dot, grad_y_sum = _column_dot(grad_y, y, acc), None
    else:
        y_dot, grad_y_sum = _column_dot(grad_y, y, acc, with_sum=True)
    return _magnitude_grad_from_sums(
        y_dot, grad_y_sum, grad_y, x, weight, bias, lora_A, lora_B, magnitude, weight_norm,
        scaling, u,
    )  # fmt: skip


def _magnitude_grad_from_sums(
    y_dot, grad_y_sum, grad_y, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, u
) -> torch.Tensor:
    """dm without dropout from y_dot = sum_rows dY * Y and (with a bias) grad_y_sum =
    sum_rows dY, both [N] in the accumulation dtype."""
    acc = accumulation_dtype(x.dtype)
    m = magnitude.to(acc)
    # Y - b = g Z, and g n = m: dm = (sum_rows dY * Y - b * sum_rows dY) / m.
    grad_m = y_dot.to(acc)
    if bias is not None:
        grad_m = grad_m - bias.to(acc) * grad_y_sum.to(acc)
    grad_m = grad_m / m
    cancelled = (m == 0).nonzero().squeeze(1)
    if cancelled.numel() > 0:
        # g = 0: Y carries nothing of Z there.
        z = _columns_of_z(x, weight, lora_A, lora_B, scaling, u, cancelled)
        direct = _column_dot(grad_y.index_select(1, cancelled), z, acc)
        grad_m = grad_m.index_copy(0, cancelled, direct / weight_norm.to(acc)[cancelled])
    return grad_m.to(magnitude.dtype)


def _columns_of_z(x, weight, lora_A, lora_B, scaling, u, columns) -> torch.Tensor:
    """Z = X W^T + s U B^T [M, len(columns)] at those columns, from their rows of W and
    B only, in the accumulation dtype (U recomputed where the backend kept none)."""
    acc = accumulation_dtype(x.dtype)
    if u.shape[0] != x.shape[0]:
        u = x.to(acc) @ lora_A.to(acc).t()
    z = F.linear(x, weight.index_select(0, columns)).to(acc)
    return z + scaling * (u @ lora_B.index_select(0, columns).to(acc).t())


@dora_backward.register_fake
def _backward_fake(
    grad_y, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, dropout_p, seed,
    u, keep_bits, kept, backend, nx, nl, nm, ns, nb,
):  # fmt: skip
    def maybe(flag, like):
        return like.new_empty(like.shape if flag else (0,))

    return (
        maybe(nx, x),
        maybe(nl, lora_A),
        maybe(nl, lora_B),
        maybe(nm, magnitude),
        maybe(ns, scaling),
        maybe(nb, weight[:, 0]),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, p, seed, backend = inputs
    y, u, keep_bits, dropped_base = output
    # Without dropout the output itself (Z is read back from it), with dropout P.
    kept = y if p == 0.0 else dropped_base
    ctx.save_for_backward(
        x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, seed, u, keep_bits, kept
    )
    ctx.dropout_p, ctx.backend = p, backend
    ctx.mark_non_differentiable(u, keep_bits, dropped_base)


def _backward(ctx, grad_y, grad_u, grad_keep_bits, grad_dropped_base):
    x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling, seed, u, keep_bits, kept = (
        ctx.saved_tensors
    )
    need = ctx.needs_input_grad
    need_lora = need[LORA_A] or need[LORA_B]
    differentiable = [t for t in (grad_y, x, lora_A, lora_B, magnitude, scaling) if t.requires_grad]
    second_order = torch.is_grad_enabled() and bool(differentiable)
    with torch.no_grad():
        grad_x, grad_A, grad_B, grad_m, grad_scaling, grad_bias = dora_backward(
            grad_y, x, weight, bias, lora_A, lora_B, magnitude, weight_norm, scaling,
            ctx.dropout_p, seed, u, keep_bits, kept, ctx.backend,
            need[X], need_lora, need[MAGNITUDE], need[SCALING], need[BIAS],
        )  # fmt: skip
    grads = (
        grad_x if need[X] else None,
        None,  # weight is frozen: dora_linear routes a trainable weight elsewhere
        grad_bias if need[BIAS] else None,
        grad_A if need[LORA_A] else None,
        grad_B if need[LORA_B] else None,
        grad_m if need[MAGNITUDE] else None,
        None,  # n is detached, as in peft
        grad_scaling if need[SCALING] else None,
        None,
        None,
        None,
    )
    return contract._first_order_only(grads, differentiable) if second_order else grads


dora_forward.register_autograd(_backward, setup_context=_setup_context)
