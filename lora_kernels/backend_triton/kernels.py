"""The Triton kernels of the "triton" backend (`launch.py` calls them, one launcher each).

Math and names follow docs/design.md (M tokens, K in_features, N out_features, R rank;
G = dY B):

    forward   1. lora_shrink_kernel    U = D(X) A^T                [M, R]  fp32
                                       and the keep mask's bits    [M, ceil(K/8)] uint8
              2. lora_fwd_kernel       Y = s U B^T + X W^T + b     [M, N]  written once
    backward  3. lora_bwd_dy_kernel    one pass over dY: G = dY B, and partial sums of
                                       dB = s dY^T U (R <= 16), db and ds = sum(G * U)
              4. lora_bwd_dx_kernel    dX = s D(G A) + dY W        [M, K]  written once
              5. lora_bwd_da_kernel    dA = s G^T D(X)             [R, K]  split over M
                 lora_bwd_db_kernel    dB = s dY^T U               [N, R]  split over M,
                                       for R > 16 (else made by the dY pass)
              6. sum_partials_kernel   fp32 partial sums -> the gradient, in its dtype
              (7. dropout_mask_kernel  the mask's bits from the seed alone, when
                                       backward is given none; a byte mask for tests)

DoRA (`lora_kernels.dora_op`, through `dora_forward` / `dora_backward` of this package)
runs the same kernels with flags: g = m / n in the forward epilogue (ROW_SCALE) or, with
dropout, a second accumulator for P = (X * keep) W^T over the same W tiles
(DROPPED_BASE); g on the B tiles of the dY pass, which also sums dY * Y or dY * P for dm
(COMPUTE_DM); g on the dY tiles of dX, or with dropout a second accumulator for
(dY diag((g - 1) / (1 - p))) W, masked in the epilogue.

The keep mask is generated once, in the forward: the shrink runs Philox (one
`tl.randint4x` call per four elements of a row, the bit-exact rule of
`reference.dropout_keep_mask`), applies the mask and writes it packed one bit per
element (`keep_bits`, the layout of `reference.pack_keep_mask`: M * ceil(K/8) bytes,
1/16 of bytes(x) for 16-bit x). Backward keeps x, U, the seed and the bits; the dX and
dA kernels read the bits and generate no random numbers.

Where this departs from the kernel plan of docs/design.md, and why:
- The R-wide LoRA step opens the accumulator (a prologue) rather than closing it: in dX
  the mask applies to s G A alone, so that term is masked while it is alone in the
  accumulator, then the N loop adds dY W. The forward does the same for symmetry.
- G sums over N and dB over M, both from the same dY tiles, so one of them must leave
  partial sums. The dY pass keeps G in registers and writes dB's partials per M-tile,
  4R / BLOCK_M of dY's bytes in extra traffic (half precision; 0.5 at R = 16 with
  BLOCK_M = 128): cheaper than a second read of dY only for small R, so above R = 16
  dB is its own M-split reduction (lora_bwd_db_kernel) and the dY pass makes G, db
  and ds.
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

A buffer a launch does not use is passed as None, with the constexpr flag that says it
is absent (HAS_BIAS, HAS_DROPOUT, NEED_G, COMPUTE_*, HAS_SCALING): code under a false
flag is never compiled, so the pointer is never read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .interpreter import BF16_FIX


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation (tl.dot, with the interpreter's bf16 fix)."""
    if BF16_FIX:
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
    if BF16_FIX:
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


@triton.jit
def _gemm_tile_dropped(
    b_acc,
    x,
    w,
    keep_bits,
    o_m,
    m_m,
    o_n,
    m_n,
    K,
    s_xm,
    s_xk,
    s_wk,
    s_wn,
    s_km,
    s_kb,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """(b_acc + X W^T, D(X) W^T without the 1 / (1 - p)) over one tile: each W tile is
    loaded once and meets both X and the masked X, the keep mask read from keep_bits."""
    b_dropped = tl.zeros(b_acc.shape, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b_x, b_w = _operand_tiles(x, w, o_m, m_m, o_n, m_n, k0, K, s_xm, s_xk, s_wk, s_wn,
                                  BLOCK_K)  # fmt: skip
        b_keep = _load_keep(keep_bits, o_m, m_m, k0, K, s_km, s_kb, BLOCK_M, BLOCK_K)
        b_acc = _dot(b_x, b_w, b_acc, INPUT_PRECISION)
        b_dropped = _dot(tl.where(b_keep, b_x, 0.0), b_w, b_dropped, INPUT_PRECISION)
    return b_acc, b_dropped


@triton.jit
def _gemm_tile_row_scaled(
    b_acc,
    dy,
    w,
    row_scale,
    o_m,
    m_m,
    o_k,
    m_k,
    N,
    s_dym,
    s_dyn,
    s_wn,
    s_wk,
    TWO_ACCUMULATORS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The dX GEMM with dY's columns scaled by r = row_scale [N] as each tile is loaded:
    b_acc + (dY diag(r)) W (and a second value to ignore), or with TWO_ACCUMULATORS (b_acc + dY W,
    (dY diag(r)) W), each W tile loaded once for both."""
    dtype = dy.dtype.element_ty
    if TWO_ACCUMULATORS:
        b_scaled = tl.zeros(b_acc.shape, dtype=tl.float32)
    else:
        b_scaled = b_acc  # not carried by the loop; the caller reads only b_acc
    for n0 in range(0, N, BLOCK_N):
        b_dy, b_w = _operand_tiles(dy, w, o_m, m_m, o_k, m_k, n0, N, s_dym, s_dyn, s_wn, s_wk,
                                   BLOCK_N)  # fmt: skip
        o_n = n0 + tl.arange(0, BLOCK_N)
        b_r = tl.load(row_scale + o_n, mask=o_n < N, other=0.0)  # [BN] fp32
        b_dy_r = _cast(b_dy.to(tl.float32) * b_r[None, :], dtype)
        if TWO_ACCUMULATORS:
            b_acc = _dot(b_dy, b_w, b_acc, INPUT_PRECISION)
            b_scaled = _dot(b_dy_r, b_w, b_scaled, INPUT_PRECISION)
        else:
            b_acc = _dot(b_dy_r, b_w, b_acc, INPUT_PRECISION)
    return b_acc, b_scaled


@triton.jit(do_not_specialize=["threshold"])
def lora_shrink_kernel(
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
def lora_fwd_kernel(
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
    row_scale,
    base_scale,
    keep_bits,
    dropped,
    s_km,
    s_kb,
    s_pm,
    s_pn,
    HAS_BIAS: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    DROPPED_BASE: tl.constexpr,
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

    DoRA (`lora_kernels.dora_op`), with g = row_scale [N] fp32:
    - ROW_SCALE (no dropout): Y = g * (X W^T + s U B^T) + b, g applied in the epilogue.
    - DROPPED_BASE (peft's dropout form): Y = X W^T + b + g * s U B^T + c * P with
      c = base_scale [N] fp32 and P = (X * keep) W^T [M, N], written to `dropped` in
      x's dtype (rounded, and added rounded). Both products come from one pass over the W
      tiles, with two accumulators; the keep mask is read from keep_bits.
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
    if ROW_SCALE or DROPPED_BASE:
        b_g = tl.load(row_scale + o_n, mask=m_n, other=0.0)  # [BN] fp32
    if DROPPED_BASE:
        b_acc = b_acc * b_g[None, :]
        b_acc, b_dropped = _gemm_tile_dropped(
            b_acc, x, w, keep_bits, o_m, m_m, o_n, m_n, K, s_xm, s_xk, s_wk, s_wn, s_km, s_kb,
            INPUT_PRECISION, BLOCK_M, BLOCK_K,
        )  # fmt: skip
        b_p = _cast(b_dropped, dtype)
        m_y = m_m[:, None] & m_n[None, :]
        tl.store(dropped + o_m[:, None] * s_pm + o_n[None, :] * s_pn, b_p, mask=m_y)
        b_c = tl.load(base_scale + o_n, mask=m_n, other=0.0)  # [BN] fp32
        b_acc += b_p.to(tl.float32) * b_c[None, :]
    else:
        b_acc = _gemm_tile(
            b_acc, x, w, o_m, m_m, o_n, m_n, K, s_xm, s_xk, s_wk, s_wn, INPUT_PRECISION, BLOCK_K
        )
        if ROW_SCALE:
            b_acc = b_acc * b_g[None, :]

    if HAS_BIAS:
        b_acc += tl.load(bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_y = y + o_m[:, None] * s_ym + o_n[None, :] * s_yn
    tl.store(p_y, _cast(b_acc, y.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@triton.jit
def lora_bwd_dy_kernel(
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
    row_scale,
    kept,
    dm_part,
    s_pm,
    s_pn,
    NEED_G: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    COMPUTE_DS: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    COMPUTE_DM: tl.constexpr,
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

    DoRA (`lora_kernels.dora_op`): with ROW_SCALE, B is diag(g) B (g = row_scale [N]
    fp32, applied to each B tile as it is loaded); with COMPUTE_DM, also
      dm_part[i_m, n]         = sum over its rows of dY * kept            [M_TILES, N]
    for kept [M, N] (Y, or the dropped base product P), read beside dY.
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
            if ROW_SCALE:
                b_row = tl.load(row_scale + o_n, mask=m_n, other=0.0)  # [BN] fp32
                b_b = b_b.to(tl.float32) * b_row[:, None]
            b_g = _dot(b_dy, _cast(b_b, dtype), b_g, INPUT_PRECISION)
        if COMPUTE_DB:
            b_db = _lora_dot(tl.trans(b_dy), b_u, None, dtype, RANK_TF32, INPUT_PRECISION)
            p_db = db_part + (i_m * N + o_n[:, None]) * R + o_r[None, :]
            tl.store(p_db, b_db, mask=m_n[:, None] & m_r[None, :])
        if COMPUTE_DBIAS:
            if i_r == 0:
                b_dbias = tl.sum(b_dy.to(tl.float32), axis=0)  # [BN]
                tl.store(dbias_part + i_m * N + o_n, b_dbias, mask=m_n)
        if COMPUTE_DM:
            if i_r == 0:
                p_kept = kept + o_m[:, None] * s_pm + o_n[None, :] * s_pn
                b_kept = tl.load(p_kept, mask=m_m[:, None] & m_n[None, :], other=0.0)
                b_dm = tl.sum(b_dy.to(tl.float32) * b_kept.to(tl.float32), axis=0)  # [BN]
                tl.store(dm_part + i_m * N + o_n, b_dm, mask=m_n)

    if NEED_G:
        p_g = g_part + (i_s * M + o_m[:, None]) * R + o_r[None, :]
        tl.store(p_g, b_g, mask=m_m[:, None] & m_r[None, :])
    if COMPUTE_DS:
        i_prog = (i_m * tl.num_programs(1) + i_s) * tl.num_programs(2) + i_r
        tl.store(ds_part + i_prog, tl.sum(b_g * b_u))


@triton.jit
def lora_bwd_dx_kernel(
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
    row_scale,
    HAS_DROPOUT: tl.constexpr,
    ROW_SCALE: tl.constexpr,
    DROPPED_BASE: tl.constexpr,
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

    DoRA (`lora_kernels.dora_op`), with r = row_scale [N] fp32:
    - ROW_SCALE (no dropout, r = g): dY W becomes (dY diag(g)) W, g applied to each dY
      tile as it is loaded (dY is the left operand, which may come from registers).
    - DROPPED_BASE (dropout, r = c = (g - 1) / (1 - p)): dX = s D(G A) + dY W +
      keep * ((dY diag(c)) W), the two products from one pass over the W tiles.
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

    if ROW_SCALE or DROPPED_BASE:
        b_acc, b_scaled = _gemm_tile_row_scaled(
            b_acc, dy, w, row_scale, o_m, m_m, o_k, m_k, N, s_dym, s_dyn, s_wn, s_wk,
            DROPPED_BASE, INPUT_PRECISION, BLOCK_N,
        )  # fmt: skip
        if DROPPED_BASE:
            # Read again, not held across the loop beside two accumulators.
            b_keep = _load_keep(keep_bits, o_m, m_m, i_k * BLOCK_K, K, s_km, s_kb, BLOCK_M,
                                BLOCK_K)  # fmt: skip
            b_acc += tl.where(b_keep, b_scaled, 0.0)
    else:
        b_acc = _gemm_tile(
            b_acc, dy, w, o_m, m_m, o_k, m_k, N, s_dym, s_dyn, s_wn, s_wk, INPUT_PRECISION,
            BLOCK_N,
        )  # fmt: skip

    p_dx = dx + o_m[:, None] * s_dxm + o_k[None, :] * s_dxk
    tl.store(p_dx, _cast(b_acc, dx.dtype.element_ty), mask=m_m[:, None] & m_k[None, :])


@triton.jit
def lora_bwd_da_kernel(
    g,
    x,
    da_part,
    keep_bits,
    M,
    R,
    K,
    M_CHUNK,
    s_gm,
    s_gr,
    s_xm,
    s_xk,
    s_km,
    s_kb,
    HAS_DROPOUT: tl.constexpr,
    RANK_TF32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """da_part[i_s] [R, K] (fp32) = G^T D(X) without the 1 / (1 - p), over the rows
    i_s * M_CHUNK .. + M_CHUNK, for G [M, R] fp32 and X [M, K], the keep mask read from
    keep_bits [M, ceil(K/8)] uint8 (with dropout; else keep_bits is None).

    Program (pid, i_s); pid walks the [R, K] tiles row by row. The scale s / (1 - p) is
    applied when the partials are summed. The sizes come as (M, R, K): the reduced
    dimension, then the output's (as in lora_bwd_db_kernel).
    """
    pid = tl.program_id(0)
    i_s = tl.program_id(1).to(tl.int64)
    num_k = tl.cdiv(K, BLOCK_K)
    i_r = (pid // num_k).to(tl.int64)
    i_k = (pid % num_k).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_k = i_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_r = o_r < R
    m_k = o_k < K
    m_start = i_s * M_CHUNK
    m_end = min(m_start + M_CHUNK, M)
    dtype = x.dtype.element_ty

    b_acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_m = o_m < m_end
        p_g = g + o_m[:, None] * s_gm + o_r[None, :] * s_gr
        p_x = x + o_m[:, None] * s_xm + o_k[None, :] * s_xk
        b_g = tl.load(p_g, mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
        b_x = tl.load(p_x, mask=m_m[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        if HAS_DROPOUT:
            b_keep = _load_keep(keep_bits, o_m, m_m, i_k * BLOCK_K, K, s_km, s_kb, BLOCK_M, BLOCK_K)
            b_x = tl.where(b_keep, b_x, 0.0)
        b_acc = _lora_dot(tl.trans(b_g), b_x, b_acc, dtype, RANK_TF32, INPUT_PRECISION)

    p_da = da_part + (i_s * R + o_r[:, None]) * K + o_k[None, :]
    tl.store(p_da, b_acc, mask=m_r[:, None] & m_k[None, :])


@triton.jit
def lora_bwd_db_kernel(
    dy,
    u,
    db_part,
    M,
    N,
    R,
    M_CHUNK,
    s_dym,
    s_dyn,
    s_um,
    s_ur,
    RANK_TF32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """db_part[i_s] [N, R] (fp32) = dY^T U (unscaled) over the rows i_s * M_CHUNK ..
    + M_CHUNK, for dY [M, N] and U [M, R] fp32: dB on its own, for R above the rank the
    dY pass fuses it at.

    Program (pid, i_s); pid walks the [N, R] tiles row by row. The scale s is applied
    when the partials are summed.
    """
    pid = tl.program_id(0)
    i_s = tl.program_id(1).to(tl.int64)
    num_r = tl.cdiv(R, BLOCK_R)
    i_n = (pid // num_r).to(tl.int64)
    i_r = (pid % num_r).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    m_n = o_n < N
    m_r = o_r < R
    m_start = i_s * M_CHUNK
    m_end = min(m_start + M_CHUNK, M)
    dtype = dy.dtype.element_ty

    b_acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        o_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        m_m = o_m < m_end
        p_dy = dy + o_m[:, None] * s_dym + o_n[None, :] * s_dyn
        p_u = u + o_m[:, None] * s_um + o_r[None, :] * s_ur
        b_dy = tl.load(p_dy, mask=m_m[:, None] & m_n[None, :], other=0.0)  # [BM, BN]
        b_u = tl.load(p_u, mask=m_m[:, None] & m_r[None, :], other=0.0)  # [BM, BR]
        b_acc = _lora_dot(tl.trans(b_dy), b_u, b_acc, dtype, RANK_TF32, INPUT_PRECISION)

    p_db = db_part + (i_s * N + o_n[:, None]) * R + o_r[None, :]
    tl.store(p_db, b_acc, mask=m_n[:, None] & m_r[None, :])


@triton.jit
def sum_partials_kernel(
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
def dropout_mask_kernel(
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
