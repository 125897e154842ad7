"""The "triton" backend: fused Triton kernels for the LoRA linear op and its backward.

Math and names follow docs/backends.md (M tokens, K in_features, N out_features, R
rank; G = dY B):

    forward   1. _lora_shrink_kernel    U = D(X) A^T                [M, R]  fp32
                                        and the keep mask's bits    [M, ceil(K/8)] uint8
              2. _lora_fwd_kernel       Y = s U B^T + X W^T + b     [M, N]  written once
    backward  3. _lora_bwd_dy_kernel    one pass over dY: G = dY B, and partial sums of
                                        dB = s dY^T U (R <= 16), db and ds = sum(G * U)
              4. _lora_bwd_dx_kernel    dX = s D(G A) + dY W        [M, K]  written once
              5. _lora_bwd_tn_kernel    dA = s G^T D(X), split over M (and dB for R > 16)
              6. _sum_partials_kernel   fp32 partial sums -> the gradient, in its dtype
              (7. _dropout_mask_kernel  the mask's bits from the seed alone, when
                                        backward is given none; a byte mask for tests)

The keep mask is generated once, in the forward: the shrink runs Philox (one
`tl.randint4x` call per four elements of a row, the bit-exact rule of
`reference.dropout_keep_mask`), applies the mask and writes it packed one bit per
element (`keep_bits`, the layout of `reference.pack_keep_mask`: M * ceil(K/8) bytes,
1/16 of bytes(x) for 16-bit x). Backward keeps x, U, the seed and the bits; the dX and
dA kernels read the bits and generate no random numbers.

Where this departs from the plan of the design notes, and why:
- The R-wide LoRA step opens the accumulator (a prologue) rather than closing it: in dX
  the mask applies to s G A alone, so that term is masked while it is alone in the
  accumulator, then the N loop adds dY W. The forward does the same for symmetry.
- G sums over N and dB over M, both from the same dY tiles, so one of them must leave
  partial sums. The dY pass keeps G in registers and writes dB's partials per M-tile,
  4R / BLOCK_M of dY's bytes in extra traffic (half precision; 0.5 at R = 16 with
  BLOCK_M = 128): cheaper than a second read of dY only for small R, so above R = 16
  dB is its own M-split reduction (kernel 5) and the dY pass makes G, db and ds.
- The dY pass is also split over N (G as fp32 partials, reduced by kernel 6): M / BLOCK_M
  programs alone (64 at M = 8192) would leave half of an H100 idle.
- Reductions are split for parallelism and summed in a fixed order from fp32 partial
  buffers, never with atomics: gradients are bit-reproducible run to run.

Numerics:
- Every product accumulates in fp32. The big GEMMs and the shrink run on the tensor
  cores in x's dtype (float32 adapter tiles are rounded to it on load; no float32 copy
  of x is ever made), and so does G = dY B. The rank-R products that meet the fp32 U or
  G (s U B^T, G A, dY^T U, G^T D(X)) run in fp32 on TF32 tensor cores when x is half
  precision: fp32's range, so s U or G beyond fp16's maximum does not overflow where the
  float32 reference does not, at fp16's 10 mantissa bits. float32 x uses TF32 exactly
  when `torch.backends.cuda.matmul.allow_tf32` is set, else IEEE fp32 dots (FMA, no
  tensor cores, smaller tiles).
- Dropout enters as a select (`where(keep, x, 0)`), never as a multiply by 1 / (1 - p)
  in half precision: the scale multiplies the float32 accumulator.
- All offsets are int64 (program ids and column offsets are cast before they meet a
  stride), so tensors beyond 2^31 elements and any strides of x and dY work.

Configs come from `kernel_configs` (autotuned on the problem sizes; pruned per dtype,
dot precision, dropout and R-block to what compiles without spills, checked for sm_80
and sm_90 by benchmarks/compile_report.py). Under TRITON_INTERPRET=1 the same kernels
run on CPU tensors with one small config.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import reference
from .contract import backward_fake, forward_fake, keep_bits_shape, register_lora_autograd

# The kernels were decorated for the interpreter iff this was set when they were defined.
_INTERPRET = bool(triton.knobs.runtime.interpret)

# Two bfloat16 defects of Triton 3.9's interpreter, worked around only under it: tl.dot
# multiplies bf16 operands as their raw uint16 bits (_dot widens them to fp32 first:
# exact, same fp32 accumulation), and fp32 -> bf16 casts truncate where the GPU rounds
# to nearest even (_cast rounds the fp32 bits first).
_INTERPRETER_BF16_FIX = tl.constexpr(_INTERPRET)

# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (tl.dot, with the interpreter's bf16 fix)."""
    if _INTERPRETER_BF16_FIX:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _lora_dot(
    a, b, acc, dtype: tl.constexpr, RANK_TF32: tl.constexpr, INPUT_PRECISION: tl.constexpr
):
    """acc + a @ b for a rank-R product with an fp32 operand (U, G, float32 adapters).

    With half-precision x (RANK_TF32) it runs in fp32 on TF32 tensor cores: the half
    operand widens exactly, U and G keep fp32's range (s U or G beyond fp16's maximum
    do not overflow) and TF32 keeps fp16's 10 mantissa bits. With float32 x it is an
    fp32 dot at torch's TF32 setting (INPUT_PRECISION).
    """
    if RANK_TF32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32")
    return _dot(_cast(a, dtype), _cast(b, dtype), acc, INPUT_PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even (also under the interpreter)."""
    if _INTERPRETER_BF16_FIX:
        if dtype == tl.bfloat16:
            if x.dtype == tl.float32:
                b_bits = x.to(tl.uint32, bitcast=True)
                b_bits = (b_bits + (0x7FFF + ((b_bits >> 16) & 1))) & 0xFFFF0000
                x = b_bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _keep_bits(seed, threshold, o_m, k_start, K, BLOCK_K: tl.constexpr):
    """The keep mask of rows o_m (int64) and columns k_start + arange(BLOCK_K) packed one
    bit per element: int32 [BLOCK_M, BLOCK_K // 8] holding bytes (k_start a multiple of 8).

    Philox4x32-10 of counter q = m * ceil(K/4) + k // 4, word k % 4, keep = word >= T
    (unsigned). Bit i of byte j is column 8 j + i (`reference.pack_keep_mask`), 0 beyond
    column K: the words of counters 2 j and 2 j + 1 of the tile give bits 0-3 and 4-7, so
    the packing is elementwise.
    """
    o_c = k_start + 8 * tl.arange(0, BLOCK_K // 8).to(tl.int64)  # first column of a byte
    o_q = o_m[:, None] * ((K + 3) // 4) + (o_c // 4)[None, :]
    b_e0, b_e1, b_e2, b_e3 = tl.randint4x(seed, o_q)  # columns 8 j + 0..3
    b_o0, b_o1, b_o2, b_o3 = tl.randint4x(seed, o_q + 1)  # columns 8 j + 4..7
    n_k = (K - o_c)[None, :]  # columns of the byte below K
    b_bits = ((b_e0 >= threshold) & (n_k > 0)).to(tl.int32)
    b_bits |= ((b_e1 >= threshold) & (n_k > 1)).to(tl.int32) << 1
    b_bits |= ((b_e2 >= threshold) & (n_k > 2)).to(tl.int32) << 2
    b_bits |= ((b_e3 >= threshold) & (n_k > 3)).to(tl.int32) << 3
    b_bits |= ((b_o0 >= threshold) & (n_k > 4)).to(tl.int32) << 4
    b_bits |= ((b_o1 >= threshold) & (n_k > 5)).to(tl.int32) << 5
    b_bits |= ((b_o2 >= threshold) & (n_k > 6)).to(tl.int32) << 6
    b_bits |= ((b_o3 >= threshold) & (n_k > 7)).to(tl.int32) << 7
    return b_bits


@triton.jit
def _unpack_bits(bits, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """keep [BLOCK_M, BLOCK_K] (bool) from its bytes bits [BLOCK_M, BLOCK_K // 8] (int32)."""
    b_keep = (bits[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1  # [BM, BK/8, 8]
    return tl.reshape(b_keep, (BLOCK_M, BLOCK_K)) != 0


@triton.jit
def _bits_offsets(keep_bits, o_m, m_m, k_start, K, s_km, s_kb, BLOCK_K: tl.constexpr):
    """(pointers, mask) of the bytes [BLOCK_M, BLOCK_K // 8] of keep_bits [M, ceil(K/8)]
    holding rows o_m (int64) and columns k_start + arange(BLOCK_K), k_start % 8 == 0."""
    o_b = k_start // 8 + tl.arange(0, BLOCK_K // 8).to(tl.int64)
    p_bits = keep_bits + o_m[:, None] * s_km + o_b[None, :] * s_kb
    return p_bits, m_m[:, None] & (o_b < (K + 7) // 8)[None, :]


@triton.jit
def _load_keep(
    keep_bits, o_m, m_m, k_start, K, s_km, s_kb, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    """keep [BLOCK_M, BLOCK_K] (bool) of rows o_m (int64) and columns k_start +
    arange(BLOCK_K), read from keep_bits [M, ceil(K/8)] uint8."""
    p_bits, m_bits = _bits_offsets(keep_bits, o_m, m_m, k_start, K, s_km, s_kb, BLOCK_K)
    b_bits = tl.load(p_bits, mask=m_bits, other=0).to(tl.int32)  # [BM, BK/8]
    return _unpack_bits(b_bits, BLOCK_M, BLOCK_K)


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(i_m, i_n) of program `pid` in the grouped order of Triton's matmul tutorial."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    i_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    i_n = (pid % num_pid_in_group) // group_size_m
    return i_m, i_n


@triton.jit
def _operand_tiles(
    lhs, rhs, o_m, m_m, o_c, m_c, l0, L, s_lm, s_ll, s_rl, s_rc, BLOCK_L: tl.constexpr
):
    """(lhs[o_m, l0:l0+BLOCK_L], rhs[l0:l0+BLOCK_L, o_c]), zero outside the bounds: one
    step of a tile product over the shared dimension L."""
    o_l = l0 + tl.arange(0, BLOCK_L).to(tl.int64)
    m_l = o_l < L
    p_l = lhs + o_m[:, None] * s_lm + o_l[None, :] * s_ll
    p_r = rhs + o_l[:, None] * s_rl + o_c[None, :] * s_rc
    b_l = tl.load(p_l, mask=m_m[:, None] & m_l[None, :], other=0.0)  # [BM, BL]
    b_r = tl.load(p_r, mask=m_l[:, None] & m_c[None, :], other=0.0)  # [BL, BC]
    return b_l, b_r


@triton.jit
def _rank_r_tile(
    lhs,
    rhs,
    o_m,
    m_m,
    o_c,
    m_c,
    R,
    s_lm,
    s_lr,
    s_rr,
    s_rc,
    dtype: tl.constexpr,
    RANK_TF32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """lhs[o_m, :R] @ rhs[:R, o_c] in fp32, in R-wide steps: the rank-R term (U B^T in
    the forward GEMM, G A in the dX GEMM) that opens a tile's accumulator."""
    b_acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        b_l, b_r = _operand_tiles(lhs, rhs, o_m, m_m, o_c, m_c, r0, R, s_lm, s_lr, s_rr, s_rc,
                                  BLOCK_R)  # fmt: skip
        b_acc = _lora_dot(b_l, b_r, b_acc, dtype, RANK_TF32, INPUT_PRECISION)
    return b_acc


@triton.jit
def _gemm_tile(
    b_acc,
    lhs,
    rhs,
    o_m,
    m_m,
    o_c,
    m_c,
    L,
    s_lm,
    s_ll,
    s_rl,
    s_rc,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """b_acc + lhs[o_m, :L] @ rhs[:L, o_c]: the main loop of the forward (X W^T) and dX
    (dY W) GEMMs, BLOCK_L at a time."""
    for l0 in range(0, L, BLOCK_L):
        b_l, b_r = _operand_tiles(lhs, rhs, o_m, m_m, o_c, m_c, l0, L, s_lm, s_ll, s_rl, s_rc,
                                  BLOCK_L)  # fmt: skip
        b_acc = _dot(b_l, b_r, b_acc, INPUT_PRECISION)
    return b_acc


@triton.jit(do_not_specialize=["threshold"])
def _lora_shrink_kernel(
    x,
    a,
    u,
    keep_bits,
    seed,
    M,
    K,
    R,
    s_xm,
    s_xk,
    s_ar,
    s_ak,
    s_um,
    s_ur,
    s_km,
    s_kb,
    threshold,
    dropout_scale,
    HAS_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """U [M, R] (fp32) = D(X) A^T for X [M, K], A [R, K], keep mask from the seed; with
    dropout also keep_bits [M, ceil(K/8)] uint8, the mask packed one bit per element."""
    i_m = tl.program_id(0).to(tl.int64)
    i_r = tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_r = o_r < R
    if HAS_DROPOUT:
        b_seed = tl.load(seed)
        b_threshold = threshold.to(tl.uint32, bitcast=True)
        # The programs of an M-tile's R-split make the same mask: the first writes its bits.
        # (A compare: Triton 3.9's interpreter rejects the store mask m_m & (i_r == 0).)
        m_bits = o_m < tl.where(i_r == 0, M, 0)

    b_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        m_k = o_k < K
        p_x = x + o_m[:, None] * s_xm + o_k[None, :] * s_xk
        p_a = a + o_k[:, None] * s_ak + o_r[None, :] * s_ar
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        b_a = tl.load(p_a, mask=m_k[:, None] & m_r[None, :], other=0.0)  # [BK, BR]
        if HAS_DROPOUT:
            # The mask applied is the one decoded from the bits written (as in backward).
            b_bits = _keep_bits(b_seed, b_threshold, o_m, k0, K, BLOCK_K)  # [BM, BK/8]
            p_bits, m_bits_k = _bits_offsets(keep_bits, o_m, m_bits, k0, K, s_km, s_kb, BLOCK_K)
            tl.store(p_bits, b_bits.to(tl.uint8), mask=m_bits_k)
            b_x = tl.where(_unpack_bits(b_bits, BLOCK_M, BLOCK_K), b_x, 0.0)
        b_acc = _dot(b_x, _cast(b_a, b_x.dtype), b_acc, INPUT_PRECISION)
    if HAS_DROPOUT:
        b_acc = b_acc * dropout_scale

    p_u = u + o_m[:, None] * s_um + o_r[None, :] * s_ur
    tl.store(p_u, b_acc, mask=m_m[:, None] & m_r[None, :])


@triton.jit
def _lora_fwd_kernel(
    x,
    w,
    bias,
    u,
    b,
    y,
    scaling,
    M,
    N,
    K,
    R,
    s_xm,
    s_xk,
    s_wn,
    s_wk,
    s_um,
    s_ur,
    s_bn,
    s_br,
    s_ym,
    s_yn,
    HAS_BIAS: tl.constexpr,
    RANK_TF32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Y [M, N] = X W^T + b + s U B^T for X [M, K], W [N, K], U [M, R] fp32, B [N, R].

    The LoRA term is the accumulator's first R-wide step, the bias its epilogue.
    """
    pid = tl.program_id(0)
    i_m, i_n = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    o_m = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = i_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N
    dtype = x.dtype.element_ty

    # s U B^T (B^T [R, N] read through B's strides), then + X W^T (W^T [K, N]).
    b_acc = _rank_r_tile(
        u, b, o_m, m_m, o_n, m_n, R, s_um, s_ur, s_br, s_bn,
        dtype, RANK_TF32, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R,
    )  # fmt: skip
    b_acc = b_acc * tl.load(scaling)
    b_acc = _gemm_tile(
        b_acc, x, w, o_m, m_m, o_n, m_n, K, s_xm, s_xk, s_wk, s_wn, INPUT_PRECISION, BLOCK_K
    )

    if HAS_BIAS:
        b_acc += tl.load(bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_y = y + o_m[:, None] * s_ym + o_n[None, :] * s_yn
    tl.store(p_y, _cast(b_acc, y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def _lora_bwd_dy_kernel(
    dy,
    b,
    u,
    g_part,
    db_part,
    dbias_part,
    ds_part,
    M,
    N,
    R,
    N_CHUNK,
    s_dym,
    s_dyn,
    s_bn,
    s_br,
    s_um,
    s_ur,
    NEED_G: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    COMPUTE_DS: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr,
    RANK_TF32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One pass over dY [M, N] for the rows of one M-tile and the columns of one N-chunk.

    With B [N, R], U [M, R] (fp32), the program (i_m, i_s, i_r) writes, all in fp32:
      g_part[i_s, m, r]       = sum over its N-chunk of dY B              [N_SPLIT, M, R]
      db_part[i_m, n, r]      = sum over its rows of dY^T U (unscaled)    [M_TILES, N, R]
      dbias_part[i_m, n]      = sum over its rows of dY                   [M_TILES, N]
      ds_part[program]        = sum(g_part tile * U tile)                 [programs]
    """
    i_m = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1).to(tl.int64)
    i_r = tl.program_id(2).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_m = o_m < M
    m_r = o_r < R
    n_start = i_s * N_CHUNK
    n_end = min(n_start + N_CHUNK, N)
    dtype = dy.dtype.element_ty

    if COMPUTE_DB or COMPUTE_DS:
        p_u = u + o_m[:, None] * s_um + o_r[None, :] * s_ur
        b_u = tl.load(p_u, mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
    b_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        m_n = o_n < n_end
        p_dy = dy + o_m[:, None] * s_dym + o_n[None, :] * s_dyn
        b_dy = tl.load(p_dy, mask=m_m[:, None] & m_n[None, :], other=0.0)  # [BM, BN]
        if NEED_G:
            p_b = b + o_n[:, None] * s_bn + o_r[None, :] * s_br
            b_b = tl.load(p_b, mask=m_n[:, None] & m_r[None, :], other=0.0)  # [BN, BR]
            b_g = _dot(b_dy, _cast(b_b, dtype), b_g, INPUT_PRECISION)
        if COMPUTE_DB:
            b_db = _lora_dot(tl.trans(b_dy), b_u, None, dtype, RANK_TF32, INPUT_PRECISION)
            p_db = db_part + (i_m * N + o_n[:, None]) * R + o_r[None, :]
            tl.store(p_db, b_db, mask=m_n[:, None] & m_r[None, :])
        if COMPUTE_DBIAS:
            if i_r == 0:
                b_dbias = tl.sum(b_dy.to(tl.float32), axis=0)  # [BN]
                tl.store(dbias_part + i_m * N + o_n, b_dbias, mask=m_n)

    if NEED_G:
        p_g = g_part + (i_s * M + o_m[:, None]) * R + o_r[None, :]
        tl.store(p_g, b_g, mask=m_m[:, None] & m_r[None, :])
    if COMPUTE_DS:
        i_prog = (i_m * tl.num_programs(1) + i_s) * tl.num_programs(2) + i_r
        tl.store(ds_part + i_prog, tl.sum(b_g * b_u))


@triton.jit
def _lora_bwd_dx_kernel(
    dy,
    w,
    g,
    a,
    dx,
    scaling,
    keep_bits,
    M,
    N,
    K,
    R,
    s_dym,
    s_dyn,
    s_wn,
    s_wk,
    s_gm,
    s_gr,
    s_ar,
    s_ak,
    s_dxm,
    s_dxk,
    s_km,
    s_kb,
    dropout_scale,
    HAS_DROPOUT: tl.constexpr,
    RANK_TF32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dX [M, K] = s D(G A) + dY W for G [M, R] fp32, A [R, K], dY [M, N], W [N, K], the
    keep mask read from keep_bits [M, ceil(K/8)] uint8 (one bit per element).

    The masked LoRA term fills the accumulator first (the mask applies to it alone),
    then the N loop adds dY W; dX is written once.
    """
    pid = tl.program_id(0)
    i_m, i_k = _grouped_tile(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    o_m = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = i_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_m = o_m < M
    m_k = o_k < K
    dtype = dy.dtype.element_ty

    # s D(G A), then + dY W.
    b_acc = _rank_r_tile(
        g, a, o_m, m_m, o_k, m_k, R, s_gm, s_gr, s_ar, s_ak,
        dtype, RANK_TF32, INPUT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_R,
    )  # fmt: skip
    b_acc = b_acc * tl.load(scaling)
    if HAS_DROPOUT:
        b_keep = _load_keep(keep_bits, o_m, m_m, i_k * BLOCK_K, K, s_km, s_kb, BLOCK_M, BLOCK_K)
        b_acc = tl.where(b_keep, b_acc * dropout_scale, 0.0)

    b_acc = _gemm_tile(
        b_acc, dy, w, o_m, m_m, o_k, m_k, N, s_dym, s_dyn, s_wn, s_wk, INPUT_PRECISION, BLOCK_N
    )

    p_dx = dx + o_m[:, None] * s_dxm + o_k[None, :] * s_dxk
    tl.store(p_dx, _cast(b_acc, dx.dtype.element_ty), mask=m_m[:, None] & m_k[None, :])


@triton.jit
def _lora_bwd_tn_kernel(
    lhs,
    rhs,
    c_part,
    keep_bits,
    M,
    P,
    Q,
    M_CHUNK,
    s_lm,
    s_lp,
    s_rm,
    s_rq,
    s_km,
    s_kb,
    HAS_DROPOUT: tl.constexpr,
    DOT_LHS_DTYPE: tl.constexpr,
    RANK_TF32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """c_part[i_s] [P, Q] (fp32) = L^T keep(Rhs) over rows i_s * M_CHUNK .. + M_CHUNK.

    L [M, P], Rhs [M, Q]; the keep mask of an [M, Q] input is read from keep_bits
    [M, ceil(Q/8)] uint8 (dA: L = G, Rhs = X, Q = K). Operands meet in L's dtype if
    DOT_LHS_DTYPE (dB: L = dY, Rhs = U), else in Rhs's (dA). Program (pid, i_s); pid
    walks the [P, Q] tiles row by row.
    """
    pid = tl.program_id(0)
    i_s = tl.program_id(1).to(tl.int64)
    num_q = tl.cdiv(Q, BLOCK_Q)
    i_p = (pid // num_q).to(tl.int64)
    i_q = (pid % num_q).to(tl.int64)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    o_q = i_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    m_p = o_p < P
    m_q = o_q < Q
    m_start = i_s * M_CHUNK
    m_end = min(m_start + M_CHUNK, M)
    if DOT_LHS_DTYPE:
        dtype = lhs.dtype.element_ty
    else:
        dtype = rhs.dtype.element_ty

    b_acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_m = o_m < m_end
        p_l = lhs + o_m[:, None] * s_lm + o_p[None, :] * s_lp
        p_r = rhs + o_m[:, None] * s_rm + o_q[None, :] * s_rq
        b_l = tl.load(p_l, mask=m_m[:, None] & m_p[None, :], other=0.0)  # [BM, BP]
        b_r = tl.load(p_r, mask=m_m[:, None] & m_q[None, :], other=0.0)  # [BM, BQ]
        if HAS_DROPOUT:
            b_keep = _load_keep(keep_bits, o_m, m_m, i_q * BLOCK_Q, Q, s_km, s_kb, BLOCK_M, BLOCK_Q)
            b_r = tl.where(b_keep, b_r, 0.0)
        b_acc = _lora_dot(tl.trans(b_l), b_r, b_acc, dtype, RANK_TF32, INPUT_PRECISION)

    p_c = c_part + (i_s * P + o_p[:, None]) * Q + o_q[None, :]
    tl.store(p_c, b_acc, mask=m_p[:, None] & m_q[None, :])


@triton.jit
def _sum_partials_kernel(
    part,
    out,
    scaling,
    T,
    L,
    scale,
    HAS_SCALING: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """out [L] = scale (* s) * sum over t of part [T, L] (fp32), in out's dtype."""
    i_l = tl.program_id(0).to(tl.int64)
    o_l = i_l * BLOCK_L + tl.arange(0, BLOCK_L)
    m_l = o_l < L
    b_acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        p_part = part + o_t[:, None] * L + o_l[None, :]
        b_part = tl.load(p_part, mask=(o_t < T)[:, None] & m_l[None, :], other=0.0)
        b_acc += tl.sum(b_part, axis=0)
    b_acc = b_acc * scale
    if HAS_SCALING:
        b_acc = b_acc * tl.load(scaling)
    tl.store(out + o_l, _cast(b_acc, out.dtype.element_ty), mask=m_l)


@triton.jit(do_not_specialize=["threshold"])
def _dropout_mask_kernel(
    keep,
    seed,
    M,
    K,
    s_km,
    s_kk,
    threshold,
    PACK_BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The keep mask of the shrink alone: packed one bit per element into keep
    [M, ceil(K/8)] uint8 if PACK_BITS (backward given no bits), else keep [M, K] int8 0/1
    (for tests). s_kk is the stride of keep's second dim (bytes or elements)."""
    i_m = tl.program_id(0).to(tl.int64)
    i_k = tl.program_id(1).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_m = o_m < M
    m_k = o_k < K
    b_threshold = threshold.to(tl.uint32, bitcast=True)
    k_start = i_k * BLOCK_K
    b_bits = _keep_bits(tl.load(seed), b_threshold, o_m, k_start, K, BLOCK_K)
    if PACK_BITS:
        p_bits, m_bits = _bits_offsets(keep, o_m, m_m, k_start, K, s_km, s_kk, BLOCK_K)
        tl.store(p_bits, b_bits.to(tl.uint8), mask=m_bits)
    else:
        b_keep = _unpack_bits(b_bits, BLOCK_M, BLOCK_K)
        p_keep = keep + o_m[:, None] * s_km + o_k[None, :] * s_kk
        tl.store(p_keep, b_keep.to(tl.int8), mask=m_m[:, None] & m_k[None, :])


# ---------------------------------------------------------------------------------------
# Autotune configurations
# ---------------------------------------------------------------------------------------

# Usable shared memory per block in bytes (the opt-in maximum), from the CUDA C++
# Programming Guide, "Technical Specifications per Compute Capability": 163 KB on
# sm_80 (A100), 227 KB on sm_90 (H100). On a live device the launchers read
# `shared_memory_per_block_optin` from torch instead.
SHARED_MEMORY_LIMIT = {(8, 0): 166912, (9, 0): 232448}
TARGETS = tuple(SHARED_MEMORY_LIMIT)
KERNEL_NAMES = ("shrink", "fwd", "bwd_dy", "bwd_dx", "bwd_da", "bwd_db")

# Host-chosen sizes of the rank dimension and of the reductions' splits.
if _INTERPRET:
    # Small, so that the tests' shapes (M up to 129, R up to 256) take several tiles,
    # R-steps and splits on every path.
    _R_STEP_MAX = 32
    _R_TILE_MAX = {False: 32, True: 32}
    _N_CHUNK_ALIGN = 16
    _M_CHUNK_ALIGN = 32
else:
    # The R-wide steps of the GEMMs (s U B^T, G A) are one MMA K-step of 16 each; the
    # kernels whose accumulator is R wide take R in tiles of 64 (32 on the FMA path,
    # fp32 without TF32, whose dot operands live in registers).
    _R_STEP_MAX = 16
    _R_TILE_MAX = {False: 64, True: 32}
    _N_CHUNK_ALIGN = 256
    _M_CHUNK_ALIGN = 256
# Up to this rank the dY pass also makes dB's partials: 4R / dy_block_m(...) of dY's
# bytes (half precision) of extra traffic, against a whole second read of dY otherwise.
_FUSED_DB_MAX_R = 16
_SUM_BLOCK_T, _SUM_BLOCK_L = (4, 64) if _INTERPRET else (8, 512)
_MASK_BLOCK_M, _MASK_BLOCK_K = (16, 32) if _INTERPRET else (32, 128)


def block_r(R: int, cap: int) -> int:
    """BLOCK_R for rank R: a power of two in [16, cap] (16 is tl.dot's minimum)."""
    return max(16, min(triton.next_power_of_2(R), cap))


def r_step_block(R: int) -> int:
    """BLOCK_R of the R-wide accumulator steps of the forward and dX GEMMs."""
    return block_r(R, _R_STEP_MAX)


def r_tile_block(R: int, fma: bool) -> int:
    """BLOCK_R of the kernels with an R-wide accumulator (shrink, dY pass, dA, dB)."""
    return block_r(R, _R_TILE_MAX[fma])


def dy_block_m(BLOCK_R: int, fma: bool) -> int:
    """Rows per program of the dY pass; fixed by the launcher, since the number of the
    dB / db partials depends on it (tall tiles cut dB's partial traffic, 4R / BLOCK_M)."""
    if _INTERPRET:
        return 16
    if fma:
        return 32
    return 128 if BLOCK_R <= 32 else 64


def launch_block_r_values(name: str, fma: bool) -> tuple:
    """Every BLOCK_R a launcher passes to kernel `name` on a GPU (for the compile report)."""
    if name in ("fwd", "bwd_dx"):
        return tuple(sorted({r_step_block(r) for r in (1, 256)}))
    values = tuple(v for v in (16, 32, 64, 128) if v <= _R_TILE_MAX[fma])
    if name == "bwd_db":  # dB runs on its own only above the fused rank
        values = tuple(v for v in values if v > _FUSED_DB_MAX_R)
    return values


def _config(num_warps, num_stages, maxnreg=None, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


def _candidates(name: str, elem: int, fma: bool) -> list[triton.Config]:
    """Configs of kernel `name` for operands of `elem` bytes (on the FMA path: fp32
    without TF32), before the per-launch checks of `kernel_configs`."""
    half = elem == 2
    if name in ("fwd", "bwd_dx"):
        # (BLOCK_M, BLOCK_<out>, BLOCK_<loop>, warps, stages): the matmul tutorial's set,
        # plus 8-warp 128x128 (room for the dropout mask of dX) and a 4-stage 128x256
        # tile for sm_90's shared memory. float32 halves the loop block; the FMA path
        # keeps small tiles (its operands sit in registers).
        out, loop = ("BLOCK_N", "BLOCK_K") if name == "fwd" else ("BLOCK_K", "BLOCK_N")
        if fma:
            shapes = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)]
            shapes += [(32, 64, 32, 4, 3)]
        else:
            bl = 64 if half else 32
            shapes = [
                (128, 256, bl, 8, 3),
                (128, 256, bl, 8, 4),
                (128, 128, bl, 8, 4),
                (128, 128, bl, 4, 4),
                (128, 64, bl, 4, 4),
                (64, 128, bl, 4, 4),
                (64, 64, bl, 4, 3),
            ]
        return [
            _config(w, s, BLOCK_M=bm, **{out: bo, loop: bl}, GROUP_M=8)
            for bm, bo, bl, w, s in shapes
        ]
    if name == "shrink":
        # Memory-bound: modest M-tiles for many programs.
        bk = 128 if half else 64
        shapes = [(64, bk, 4, 3), (128, bk // 2, 8, 3), (64, bk // 2, 4, 3), (32, bk // 2, 4, 4)]
        if fma:
            shapes = [(128, 32, 8, 3), (32, 32, 4, 4), (64, 16, 4, 4)]
        return [_config(w, s, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, w, s in shapes]
    if name == "bwd_dy":
        shapes = [(64, 8, 4), (128, 8, 3), (32, 4, 4)] if half else [(32, 8, 3), (16, 4, 3)]
        if fma:
            shapes = [(32, 4, 3), (16, 4, 4)]
        return [_config(w, s, BLOCK_N=bn) for bn, w, s in shapes]
    if name in ("bwd_da", "bwd_db"):
        # (BLOCK of the wide output dim, BLOCK_M of the reduction, warps, stages)
        wide = "BLOCK_Q" if name == "bwd_da" else "BLOCK_P"
        bm = 64 if half else 32
        shapes = [(64, bm, 4, 4), (128, bm // 2, 4, 4), (256, bm // 2, 8, 3)]
        # dA's 8-warp tile takes half the rows: ptxas spills (128, bm) in some variants
        shapes += [(128, bm // 2 if name == "bwd_da" else bm, 8, 3)]
        if fma:
            shapes = [(64, 32, 4, 4), (128, 32, 8, 3)]
            shapes += [(128, 16, 4, 4)] if name == "bwd_da" else []
        # maxnreg: without a .maxnreg the ptxas of Triton 3.9 (CUDA 13) holds these
        # kernels to 64-128 registers for occupancy and spills a few bytes in some
        # variants; with it ptxas takes what the tile needs (checked by the report).
        return [_config(w, s, 255, **{wide: bo, "BLOCK_M": bm}) for bo, bm, w, s in shapes]
    raise ValueError(f"unknown kernel {name!r}; expected one of {KERNEL_NAMES}")


def _register_estimate(name, blocks, num_warps, BLOCK_R, fma, dropout) -> int:
    """32-bit registers per thread held by a config's large tiles: the fp32 accumulator,
    the dropout mask (the shrink's Philox words and bits, the bits dX and dA decode), and
    on the FMA path the operands."""
    threads = 32 * num_warps
    if name in ("fwd", "bwd_dx"):
        out = blocks["BLOCK_N"] if name == "fwd" else blocks["BLOCK_K"]
        loop = blocks["BLOCK_K"] if name == "fwd" else blocks["BLOCK_N"]
        acc, mask = blocks["BLOCK_M"] * out, blocks["BLOCK_M"] * out
        operands = (blocks["BLOCK_M"] + out) * loop
    elif name == "shrink":
        acc, mask = blocks["BLOCK_M"] * BLOCK_R, blocks["BLOCK_M"] * blocks["BLOCK_K"]
        operands = (blocks["BLOCK_M"] + BLOCK_R) * blocks["BLOCK_K"]
    elif name == "bwd_dy":
        fused = BLOCK_R <= _FUSED_DB_MAX_R
        rows = dy_block_m(BLOCK_R, fma)
        acc = (rows + (blocks["BLOCK_N"] if fused else 0)) * BLOCK_R
        mask, operands = 0, (rows + BLOCK_R) * blocks["BLOCK_N"]
    else:
        wide = blocks.get("BLOCK_Q") or blocks["BLOCK_P"]
        acc, mask = BLOCK_R * wide, blocks["BLOCK_M"] * wide
        operands = (BLOCK_R + wide) * blocks["BLOCK_M"]
    regs = acc + (mask if dropout else 0) + (operands if fma else 0)
    return regs // threads


# Register budgets per thread for `_register_estimate`, set with the compile report
# (benchmarks/compile_report.py): above them ptxas spills. Kernels that run Philox or
# FMA dots next to their accumulator get less.
_REGISTER_BUDGET = {"fwd": 128, "bwd_dx": 128, "shrink": 80, "bwd_dy": 96}
_REGISTER_BUDGET |= {"bwd_da": 80, "bwd_db": 128}


def _smem_estimate(name, blocks, num_stages, elem, BLOCK_R, fma) -> int:
    """Shared memory of the pipelined operand tiles in bytes (an estimate, for pruning):
    x-dtype tiles take `elem` bytes an element, adapter / U / G tiles up to 4."""
    if name in ("fwd", "bwd_dx"):
        out, loop = ("BLOCK_N", "BLOCK_K") if name == "fwd" else ("BLOCK_K", "BLOCK_N")
        main = (blocks["BLOCK_M"] + blocks[out]) * blocks[loop] * elem
        lora = (blocks["BLOCK_M"] + blocks[out]) * BLOCK_R * 4
        return num_stages * main + lora
    if name == "shrink":
        return num_stages * blocks["BLOCK_K"] * (blocks["BLOCK_M"] * elem + BLOCK_R * 4)
    if name == "bwd_dy":
        rows = dy_block_m(BLOCK_R, fma)
        return num_stages * blocks["BLOCK_N"] * (rows * elem + BLOCK_R * 4)
    wide = blocks.get("BLOCK_Q") or blocks["BLOCK_P"]
    return num_stages * blocks["BLOCK_M"] * (BLOCK_R * 4 + wide * elem)


def kernel_configs(
    name: str,
    *,
    capability: tuple,
    smem_limit: int,
    dtype: torch.dtype,
    BLOCK_R: int,
    INPUT_PRECISION: str = "ieee",
    HAS_DROPOUT: bool = True,
) -> list[triton.Config]:
    """Autotune configs of kernel `name` for one launch: a GPU of `capability` with
    `smem_limit` bytes of shared memory per block, operands of `dtype`, the launcher's
    BLOCK_R, dot precision and dropout flag.

    The one source of truth for autotuning (the autotuner prunes its list with this)
    and for the ahead-of-time compile report (benchmarks/compile_report.py), which
    checks every config it returns for spills and shared memory.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    fma = elem == 4 and INPUT_PRECISION == "ieee"
    dropout = HAS_DROPOUT and name in ("shrink", "bwd_dx", "bwd_da")
    sm80 = tuple(capability) < (9, 0)
    configs = []
    for config in _candidates(name, elem, fma):
        budget = _REGISTER_BUDGET[name]
        if name in ("fwd", "bwd_dx") and not fma:
            # dX's mask doubles its tile's registers; sm_80's mma.sync holds operand
            # fragments in registers beside the accumulator, which leaves room for a
            # 128-register accumulator only in the tutorial's 8-warp half-precision
            # forward tile (measured with the compile report).
            narrow = elem == 4 or config.num_warps == 4 or name == "bwd_dx"
            if dropout or (sm80 and narrow):
                budget = 64
        if name == "shrink" and dropout and sm80 and elem == 4 and not fma:
            # Making and packing the mask's bits beside a TF32 accumulator: ptxas spills
            # the 4-warp 64x64 tile at R-block 64 on sm_80 (24 B; compile report).
            budget = 56
        regs = _register_estimate(name, config.kwargs, config.num_warps, BLOCK_R, fma, dropout)
        smem = _smem_estimate(name, config.kwargs, config.num_stages, elem, BLOCK_R, fma)
        if regs <= budget and smem <= smem_limit:
            configs.append(config)
    if not configs:
        raise RuntimeError(
            f"no config of {name} fits: {dtype}, {INPUT_PRECISION}, R-block {BLOCK_R}, "
            f"{smem_limit} B of shared memory"
        )
    return configs


def _interpreter_config(name: str) -> triton.Config:
    blocks = {
        "fwd": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
        "bwd_dx": {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32, "GROUP_M": 2},
        "shrink": {"BLOCK_M": 16, "BLOCK_K": 32},
        "bwd_dy": {"BLOCK_N": 16},
        "bwd_da": {"BLOCK_Q": 32, "BLOCK_M": 16},
        "bwd_db": {"BLOCK_P": 16, "BLOCK_M": 16},
    }[name]
    return triton.Config(blocks, num_warps=4, num_stages=1)


_JIT_KERNELS = {
    "shrink": _lora_shrink_kernel,
    "fwd": _lora_fwd_kernel,
    "bwd_dy": _lora_bwd_dy_kernel,
    "bwd_dx": _lora_bwd_dx_kernel,
    "bwd_da": _lora_bwd_tn_kernel,
    "bwd_db": _lora_bwd_tn_kernel,
}
# Keyed on the problem sizes and on what changes the config list (Triton adds dtypes).
_AUTOTUNE_KEYS = {
    "shrink": ["M", "K", "R", "HAS_DROPOUT", "INPUT_PRECISION"],
    "fwd": ["M", "N", "K", "R", "INPUT_PRECISION"],
    "bwd_dy": ["M", "N", "R", "INPUT_PRECISION"],
    "bwd_dx": ["M", "N", "K", "R", "HAS_DROPOUT", "INPUT_PRECISION"],
    "bwd_da": ["M", "P", "Q", "HAS_DROPOUT", "INPUT_PRECISION"],
    "bwd_db": ["M", "P", "Q", "INPUT_PRECISION"],
}
# The launch argument carrying the operand dtype, and the one carrying the R-block.
_DTYPE_ARG = {"shrink": "x", "fwd": "x", "bwd_dy": "dy", "bwd_dx": "dy"}
_DTYPE_ARG |= {"bwd_da": "rhs", "bwd_db": "lhs"}
_BLOCK_R_ARG = {"shrink": "BLOCK_R", "fwd": "BLOCK_R", "bwd_dy": "BLOCK_R"}
_BLOCK_R_ARG |= {"bwd_dx": "BLOCK_R", "bwd_da": "BLOCK_P", "bwd_db": "BLOCK_Q"}


@functools.cache
def _device_target(device_index: int) -> tuple[tuple[int, int], int]:
    """(compute capability, opt-in shared memory per block in bytes) of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    capability = (props.major, props.minor)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:
        limit = SHARED_MEMORY_LIMIT.get(capability, 101376)  # 99 KB: sm_86, sm_89, sm_120
    return capability, int(limit)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _config_key(config: triton.Config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


@functools.cache
def _tuned(name: str, target: tuple | None):
    """Kernel `name` under triton.autotune for a device `target` = (capability, shared
    memory limit); None: the interpreter, one small config."""
    kernel = _JIT_KERNELS[name]
    if target is None:
        return triton.autotune([_interpreter_config(name)], key=_AUTOTUNE_KEYS[name])(kernel)
    capability, smem_limit = target

    def prune(configs, named_args, **kwargs):
        allowed = kernel_configs(
            name,
            capability=capability,
            smem_limit=smem_limit,
            dtype=named_args[_DTYPE_ARG[name]].dtype,
            BLOCK_R=kwargs[_BLOCK_R_ARG[name]],
            INPUT_PRECISION=kwargs["INPUT_PRECISION"],
            HAS_DROPOUT=kwargs.get("HAS_DROPOUT", False),
        )
        keys = {_config_key(c) for c in allowed}
        return [c for c in configs if _config_key(c) in keys]

    candidates = [
        c for elem in (2, 4) for fma in (False, True) for c in _candidates(name, elem, fma)
    ]
    configs = {_config_key(c): c for c in candidates}
    return triton.autotune(
        list(configs.values()),
        key=_AUTOTUNE_KEYS[name],
        prune_configs_by={"early_config_prune": prune},
    )(kernel)


# ---------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# Triton's interpreter keeps global state while a kernel runs and is not thread-safe:
# under it, one op at a time (compiled kernels need no lock).
_INTERPRETER_LOCK = threading.Lock()


def _one_at_a_time():
    """The interpreter's lock under TRITON_INTERPRET=1, else a no-op context."""
    return _INTERPRETER_LOCK if _INTERPRET else contextlib.nullcontext()


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer of this backend comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _check_tensor(name: str, t, shape: tuple, dtypes: tuple, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        expected = "[" + ", ".join(str(d) for d in shape) + "]"
        raise ValueError(f"{name} must have shape {expected}, got {_shape(t)}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on x's device {device}, got {t.device}")


def _check_common(x, weight, lora_A, lora_B, scaling, dropout_p, seed) -> None:
    """Checks shared by forward and backward; the sizes come from x, weight and lora_A."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [M, K], got shape {_shape(x)}")
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"x must have dtype float32, float16 or bfloat16 for the triton backend, got "
            f"{x.dtype} (the 'torch' backend accepts float64)"
        )
    device = x.device
    if device.type != "cuda" and not (_INTERPRET and device.type == "cpu"):
        raise ValueError(
            f"x must be a CUDA tensor for the triton backend (CPU tensors need "
            f"TRITON_INTERPRET=1 set before lora_kernels is imported), got {device}"
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor [N, K], got {weight!r:.80}")
    if not isinstance(lora_A, torch.Tensor) or lora_A.dim() != 2:
        raise ValueError(f"lora_A must be a 2-D tensor [R, K], got {lora_A!r:.80}")
    K = x.shape[1]
    N = weight.shape[0]
    R = lora_A.shape[0]
    _check_tensor("weight", weight, (N, K), (x.dtype,), device)
    _check_tensor("lora_A", lora_A, (R, K), tuple({x.dtype, torch.float32}), device)
    _check_tensor("lora_B", lora_B, (N, R), (lora_A.dtype,), device)
    _check_tensor("scaling", scaling, (), (torch.float32,), device)
    _check_tensor("seed", seed, (), (torch.int64,), device)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


def _input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: TF32 for float32 exactly when torch allows it."""
    if dtype == torch.float32 and not _INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _dropout_args(dropout_p: float) -> tuple[bool, int, float]:
    """(has dropout, threshold as the int32 bit pattern of the uint32 T, 1 / (1 - p)).

    Dropout is on for every p > 0, as for the contract's keep_bits: a p below 2^-32 has
    T = 0, keeps everything and still has its (all-ones) bits written and read.
    """
    threshold = reference.dropout_threshold(dropout_p)
    if dropout_p == 0.0:
        return False, 0, 1.0
    # Passed as int32 (so the kernel's signature never changes), reinterpreted as uint32.
    signed = threshold - 2**32 if threshold >= 2**31 else threshold
    return True, signed, reference.dropout_scale(dropout_p)


def _device(device: torch.device) -> tuple | None:
    """(capability, shared memory limit) that picks configs; None under the interpreter."""
    if _INTERPRET:
        return None
    return _device_target(device.index if device.index is not None else 0)


def _target_programs(device: torch.device) -> int:
    """How many programs keep the device busy: two per SM (a few under the interpreter)."""
    if _INTERPRET:
        return 4
    return 2 * _sm_count(device.index if device.index is not None else 0)


def _split(total: int, other_programs: int, align: int, target: int) -> tuple[int, int]:
    """(chunk, splits) cutting `total` into aligned chunks so that splits * other_programs
    reaches `target`."""
    if total == 0:
        return align, 1
    splits = max(1, min(math.ceil(target / max(other_programs, 1)), math.ceil(total / align)))
    chunk = math.ceil(math.ceil(total / splits) / align) * align
    return chunk, math.ceil(total / chunk)


def _sum_partials(part: torch.Tensor, out: torch.Tensor, scale: float, scaling) -> None:
    """out = scale (* scaling) * part.sum(0) for part [T, *out.shape] fp32, via the kernel."""
    T = part.shape[0]
    L = out.numel()
    if L == 0:
        return
    grid = (triton.cdiv(L, _SUM_BLOCK_L),)
    wrap_triton(_sum_partials_kernel)[grid](
        part,
        out,
        scaling if scaling is not None else part,
        T,
        L,
        scale,
        HAS_SCALING=scaling is not None,
        BLOCK_T=_SUM_BLOCK_T,
        BLOCK_L=_SUM_BLOCK_L,
    )


def _forward_into(
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, y, u, keep_bits
) -> None:
    """Write Y [M, N] into y, U [M, R] (fp32) into u and, with dropout, the keep mask
    packed one bit per element into keep_bits [M, ceil(K/8)] uint8 (else ignored);
    launches nothing when M == 0."""
    _check_common(x, weight, lora_A, lora_B, scaling, dropout_p, seed)
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    if bias is not None:
        _check_tensor("bias", bias, (N,), (x.dtype,), x.device)
    _check_tensor("y", y, (M, N), (x.dtype,), x.device)
    _check_tensor("u", u, (M, R), (torch.float32,), x.device)
    has_dropout, threshold, dropout_scale = _dropout_args(dropout_p)
    if has_dropout:
        _check_tensor("keep_bits", keep_bits, (M, (K + 7) // 8), (torch.uint8,), x.device)
    else:
        keep_bits = u  # never read
    if M == 0:
        return
    precision = _input_precision(x.dtype)
    target = _device(x.device)
    fma = x.dtype == torch.float32 and precision == "ieee"
    rank_tf32 = x.dtype != torch.float32

    BLOCK_R = r_tile_block(R, fma)
    # At least one R-tile: its programs write the mask's bits (R = 0 in a direct op call).
    r_tiles = max(triton.cdiv(R, BLOCK_R), 1)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), r_tiles)
    wrap_triton(_tuned("shrink", target))[grid](
        x,
        lora_A,
        u,
        keep_bits,
        seed,
        M,
        K,
        R,
        x.stride(0),
        x.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        u.stride(0),
        u.stride(1),
        keep_bits.stride(0),
        keep_bits.stride(-1),
        threshold,
        dropout_scale,
        HAS_DROPOUT=has_dropout,
        INPUT_PRECISION=precision,
        BLOCK_R=BLOCK_R,
    )
    if N == 0:
        return
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
    wrap_triton(_tuned("fwd", target))[grid](
        x,
        weight,
        bias if bias is not None else y,
        u,
        lora_B,
        y,
        scaling,
        M,
        N,
        K,
        R,
        x.stride(0),
        x.stride(1),
        weight.stride(0),
        weight.stride(1),
        u.stride(0),
        u.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        y.stride(0),
        y.stride(1),
        HAS_BIAS=bias is not None,
        INPUT_PRECISION=precision,
        RANK_TF32=rank_tf32,
        BLOCK_R=r_step_block(R),
    )


def _backward_into(
    grad_y,
    x,
    weight,
    lora_A,
    lora_B,
    scaling,
    dropout_p,
    seed,
    u,
    keep_bits,
    grad_x,
    grad_A,
    grad_B,
    grad_scaling,
    grad_bias,
) -> None:
    """Write the gradients into the buffers given (None: not wanted).

    grad_x [M, K] (x's dtype), grad_A [R, K], grad_B [N, R] (the adapters' dtype, given
    together), grad_scaling [] (fp32), grad_bias [N] (x's dtype). With dropout the keep
    mask is read from keep_bits [M, ceil(K/8)] uint8; an empty keep_bits (shape [0]) has
    the mask made from the seed first.
    """
    _check_common(x, weight, lora_A, lora_B, scaling, dropout_p, seed)
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    device = x.device
    _check_tensor("grad_y", grad_y, (M, N), (x.dtype,), device)
    _check_tensor("u", u, (M, R), (torch.float32,), device)
    has_dropout, threshold, dropout_scale = _dropout_args(dropout_p)
    bits_shape = (M, (K + 7) // 8)
    if has_dropout and tuple(keep_bits.shape) != (0,):
        _check_tensor("keep_bits", keep_bits, bits_shape, (torch.uint8,), device)
    if grad_x is not None:
        _check_tensor("grad_x", grad_x, (M, K), (x.dtype,), device)
    if (grad_A is None) != (grad_B is None):
        raise ValueError("grad_A and grad_B must be given together (need_grad_lora)")
    if grad_A is not None:
        _check_tensor("grad_A", grad_A, (R, K), (lora_A.dtype,), device)
        _check_tensor("grad_B", grad_B, (N, R), (lora_B.dtype,), device)
    if grad_scaling is not None:
        _check_tensor("grad_scaling", grad_scaling, (), (scaling.dtype,), device)
    if grad_bias is not None:
        _check_tensor("grad_bias", grad_bias, (N,), (x.dtype,), device)

    need_lora = grad_A is not None
    need_g = grad_x is not None or need_lora or grad_scaling is not None
    fused_db = need_lora and R <= _FUSED_DB_MAX_R
    precision = _input_precision(x.dtype)
    target = _device(device)
    programs = _target_programs(device)
    fma = x.dtype == torch.float32 and precision == "ieee"
    rank_tf32 = x.dtype != torch.float32
    f32 = torch.float32

    if M == 0:
        # Sums over no rows: zeros; no launch.
        for out in (grad_A, grad_B, grad_scaling, grad_bias):
            if out is not None:
                out.zero_()
        return
    if not has_dropout:
        keep_bits = u  # never read
    elif tuple(keep_bits.shape) == (0,) and (grad_x is not None or need_lora):
        # No saved bits (a direct op call): the mask from the seed, packed, then read.
        keep_bits = _empty(bits_shape, torch.uint8, device)
        _launch_mask_kernel(seed, threshold, keep_bits, K, pack=True)

    # 3. One pass over dY: G (partials over N-chunks), dB, db and ds partials.
    g = None
    if need_g or grad_bias is not None:
        BLOCK_R = r_tile_block(R, fma)
        BLOCK_M = dy_block_m(BLOCK_R, fma)
        m_tiles = triton.cdiv(M, BLOCK_M)
        r_tiles = triton.cdiv(R, BLOCK_R)
        n_chunk, n_split = _split(N, m_tiles * r_tiles, _N_CHUNK_ALIGN, programs)
        g_part = _empty((n_split, M, R), f32, device) if need_g else u
        db_part = _empty((m_tiles, N, R), f32, device) if fused_db else u
        dbias_part = _empty((m_tiles, N), f32, device) if grad_bias is not None else u
        ds_part = u
        if grad_scaling is not None:
            ds_part = _empty((m_tiles * n_split * r_tiles,), f32, device)
        wrap_triton(_tuned("bwd_dy", target))[(m_tiles, n_split, r_tiles)](
            grad_y,
            lora_B,
            u,
            g_part,
            db_part,
            dbias_part,
            ds_part,
            M,
            N,
            R,
            n_chunk,
            grad_y.stride(0),
            grad_y.stride(1),
            lora_B.stride(0),
            lora_B.stride(1),
            u.stride(0),
            u.stride(1),
            NEED_G=need_g,
            COMPUTE_DB=fused_db,
            COMPUTE_DS=grad_scaling is not None,
            COMPUTE_DBIAS=grad_bias is not None,
            INPUT_PRECISION=precision,
            RANK_TF32=rank_tf32,
            BLOCK_M=BLOCK_M,
            BLOCK_R=BLOCK_R,
        )
        if need_g:
            if n_split == 1:
                g = g_part[0]
            else:
                g = _empty((M, R), f32, device)
                _sum_partials(g_part, g, 1.0, None)
        if fused_db:
            _sum_partials(db_part, grad_B, 1.0, scaling)
        if grad_bias is not None:
            _sum_partials(dbias_part, grad_bias, 1.0, None)
        if grad_scaling is not None:
            _sum_partials(ds_part, grad_scaling, 1.0, None)

    # 4. dX = s D(G A) + dY W.
    if grad_x is not None and K > 0:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"]),)
        wrap_triton(_tuned("bwd_dx", target))[grid](
            grad_y,
            weight,
            g,
            lora_A,
            grad_x,
            scaling,
            keep_bits,
            M,
            N,
            K,
            R,
            grad_y.stride(0),
            grad_y.stride(1),
            weight.stride(0),
            weight.stride(1),
            g.stride(0),
            g.stride(1),
            lora_A.stride(0),
            lora_A.stride(1),
            grad_x.stride(0),
            grad_x.stride(1),
            keep_bits.stride(0),
            keep_bits.stride(-1),
            dropout_scale,
            HAS_DROPOUT=has_dropout,
            INPUT_PRECISION=precision,
            RANK_TF32=rank_tf32,
            BLOCK_R=r_step_block(R),
        )

    if not need_lora:
        return
    # 5. dA = s G^T D(X) (and dB = s dY^T U when not fused), split over M.
    BLOCK_R = r_tile_block(R, fma)
    other = triton.cdiv(R, BLOCK_R) * triton.cdiv(K, 128)
    m_chunk, m_split = _split(M, other, _M_CHUNK_ALIGN, programs)
    if K > 0:
        da_part = _empty((m_split, R, K), f32, device)
        grid = lambda META: (triton.cdiv(R, BLOCK_R) * triton.cdiv(K, META["BLOCK_Q"]), m_split)
        wrap_triton(_tuned("bwd_da", target))[grid](
            g,
            x,
            da_part,
            keep_bits,
            M,
            R,
            K,
            m_chunk,
            g.stride(0),
            g.stride(1),
            x.stride(0),
            x.stride(1),
            keep_bits.stride(0),
            keep_bits.stride(-1),
            HAS_DROPOUT=has_dropout,
            DOT_LHS_DTYPE=False,
            INPUT_PRECISION=precision,
            RANK_TF32=rank_tf32,
            BLOCK_P=BLOCK_R,
        )
        _sum_partials(da_part, grad_A, dropout_scale, scaling)
    if not fused_db:
        if N == 0:
            return
        other = triton.cdiv(N, 128) * triton.cdiv(R, BLOCK_R)
        m_chunk, m_split = _split(M, other, _M_CHUNK_ALIGN, programs)
        db_part = _empty((m_split, N, R), f32, device)
        grid = lambda META: (triton.cdiv(N, META["BLOCK_P"]) * triton.cdiv(R, BLOCK_R), m_split)
        wrap_triton(_tuned("bwd_db", target))[grid](
            grad_y,
            u,
            db_part,
            u,  # no mask
            M,
            N,
            R,
            m_chunk,
            grad_y.stride(0),
            grad_y.stride(1),
            u.stride(0),
            u.stride(1),
            0,
            0,
            HAS_DROPOUT=False,
            DOT_LHS_DTYPE=True,
            INPUT_PRECISION=precision,
            RANK_TF32=rank_tf32,
            BLOCK_Q=BLOCK_R,
        )
        _sum_partials(db_part, grad_B, 1.0, scaling)


def _launch_mask_kernel(seed, threshold: int, out: torch.Tensor, K: int, pack: bool) -> None:
    """`_dropout_mask_kernel` for the mask [M, K] of a p > 0 into out: [M, ceil(K/8)] uint8
    bits if pack, else [M, K] int8. Takes no lock (callers hold it)."""
    M = out.shape[0]
    if M == 0 or K == 0:
        return
    grid = (triton.cdiv(M, _MASK_BLOCK_M), triton.cdiv(K, _MASK_BLOCK_K))
    wrap_triton(_dropout_mask_kernel)[grid](
        out,
        seed,
        M,
        K,
        out.stride(0),
        out.stride(1),
        threshold,
        PACK_BITS=pack,
        BLOCK_M=_MASK_BLOCK_M,
        BLOCK_K=_MASK_BLOCK_K,
    )


def _check_seed(seed) -> None:
    if not isinstance(seed, torch.Tensor) or seed.shape != () or seed.dtype != torch.int64:
        raise TypeError(f"seed must be a 0-dim int64 tensor, got {seed!r:.80}")


def _keep_mask_bytes(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The keep mask [M, K] as int8 0/1, written by `_dropout_mask_kernel`."""
    _check_seed(seed)
    keep = _empty((M, K), torch.int8, seed.device)
    has_dropout, threshold, _ = _dropout_args(p)
    if not has_dropout:
        return keep.fill_(1)
    with _one_at_a_time():
        _launch_mask_kernel(seed, threshold, keep, K, pack=False)
    return keep


def _keep_mask_bits(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The keep mask packed one bit per element, [M, ceil(K/8)] uint8, written by
    `_dropout_mask_kernel` alone (what backward makes when given no bits); p > 0."""
    _check_seed(seed)
    has_dropout, threshold, _ = _dropout_args(p)
    if not has_dropout:
        raise ValueError(f"the packed keep mask exists only for dropout_p > 0, got {p!r}")
    keep_bits = _empty((M, (K + 7) // 8), torch.uint8, seed.device)
    with _one_at_a_time():
        _launch_mask_kernel(seed, threshold, keep_bits, K, pack=True)
    return keep_bits


def dropout_keep_mask(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The keep mask [M, K] (bool) exactly as the kernels make it.

    `seed` is a 0-dim int64 tensor on the device; for tests against
    `reference.dropout_keep_mask`.
    """
    return _keep_mask_bytes(seed, M, K, p) == 1


# ---------------------------------------------------------------------------------------
# Op registration
# ---------------------------------------------------------------------------------------


@triton_op("lora_kernels::triton_forward", mutates_args=())
def triton_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, K = x.shape[0], x.shape[-1]  # _forward_into checks that x is 2-D
    y = _empty((M, weight.shape[0]), x.dtype, x.device)
    u = _empty((M, lora_A.shape[0]), torch.float32, x.device)
    # With dropout the shrink writes the mask's bits here; else an empty [0].
    keep_bits = _empty(keep_bits_shape(M, K, dropout_p), torch.uint8, x.device)
    with _one_at_a_time():
        _forward_into(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, y, u, keep_bits)
    return y, u, keep_bits


triton_forward.register_fake(forward_fake)


@triton_op("lora_kernels::triton_backward", mutates_args=())
def triton_backward(
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
    M, K = x.shape
    N, R = lora_B.shape
    device = x.device

    def buffer(flag, shape, dtype):
        return _empty(shape, dtype, device) if flag else _empty((0,), dtype, device)

    grad_x = buffer(need_grad_x, (M, K), x.dtype)
    grad_A = buffer(need_grad_lora, (R, K), lora_A.dtype)
    grad_B = buffer(need_grad_lora, (N, R), lora_B.dtype)
    grad_scaling = buffer(need_grad_scaling, (), scaling.dtype)
    grad_bias = buffer(need_grad_bias, (N,), x.dtype)
    with _one_at_a_time():
        _backward_into(
            grad_y,
            x,
            weight,
            lora_A,
            lora_B,
            scaling,
            dropout_p,
            seed,
            u,
            keep_bits,
            grad_x if need_grad_x else None,
            grad_A if need_grad_lora else None,
            grad_B if need_grad_lora else None,
            grad_scaling if need_grad_scaling else None,
            grad_bias if need_grad_bias else None,
        )
    return grad_x, grad_A, grad_B, grad_scaling, grad_bias


triton_backward.register_fake(backward_fake)


register_lora_autograd(triton_forward, triton_backward)


# ---------------------------------------------------------------------------------------
# The backend contract (docs/backends.md)
# ---------------------------------------------------------------------------------------


@functools.cache
def _availability() -> tuple[bool, str]:
    if _INTERPRET:
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors"
    if not torch.cuda.is_available():
        return False, (
            "no CUDA device (to run the Triton kernels on CPU tensors, set "
            "TRITON_INTERPRET=1 before importing lora_kernels)"
        )
    if torch.version.cuda is None:
        return False, "the Triton kernels are built and tuned for NVIDIA GPUs only"
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        return False, f"needs an NVIDIA GPU of compute capability 8.0 or newer, got {capability}"
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"


def availability(name: str) -> tuple[bool, str]:
    """(usable on this machine, why not). Cheap after the first call; never raises."""
    try:
        return _availability()
    except Exception as error:  # a broken CUDA setup makes the backend unusable, not fatal
        return False, f"{type(error).__name__}: {error}"


def serves(name: str, device_type: str) -> bool:
    """CUDA tensors; CPU tensors too under TRITON_INTERPRET=1."""
    return device_type == "cuda" or (_INTERPRET and device_type == "cpu")


def load(name: str):
    """(forward_op, backward_op) of the triton backend."""
    return torch.ops.lora_kernels.triton_forward, torch.ops.lora_kernels.triton_backward
