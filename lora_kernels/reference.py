"""The ground truth: the LoRA linear op, its backward and its dropout mask in plain PyTorch.

Written for clarity, not speed. Every backend is tested against this module, and the
"torch" backend is a thin op around it. The forward (`lora_linear_forward_reference`):

    D(X) = X * keep / (1 - p)            (identity when p == 0 or not training)
    U    = D(X) A^T                      [M, R]
    Y    = X W^T + b + s * U B^T         [M, N]

The backward (`lora_linear_backward_reference`), given dY [M, N]:

    G  = dY B                            [M, R]
    dX = dY W + s * D(G A)               [M, K]   (the same keep mask and 1/(1-p))
    dA = s * G^T D(X)                    [R, K]
    dB = s * dY^T U                      [N, R]
    ds = sum(G * U)                      (a learnable scaling)
    db = sum over rows of dY             (a bias that requires grad)

W is frozen: there is no dW. The keep mask is Philox4x32-10 (Salmon et al., SC'11;
the same generator as `triton.language.randint4x`), one call per four elements of a
row (docs/design.md, "Dropout mask, bit for bit"):

    q       = m * ceil(K / 4) + k // 4        (64-bit counter)
    counter = (lo32(q), hi32(q), 0, 0)
    key     = (lo32(seed), hi32(seed))
    word    = philox(counter, key)[k % 4]
    keep    = word >= floor(p * 2**32)        (unsigned compare)

DoRA (Liu et al., arXiv 2402.09353; peft's `LoraConfig(use_dora=True)`, peft 0.21),
`dora_linear_reference`, with a magnitude m [N] and n = ||W + s B A|| per output row,
detached from the graph (the paper's section 4.3, as peft does):

    without dropout, or in eval:  Y = (m/n) * (X W^T + s U B^T) + b
    with dropout, in training:    Y = X W^T + b + (m/n - 1) * D(X) W^T + (m/n) * s U B^T

with U = D(X) A^T and the same keep mask as the plain op. The second form is peft's:
the base term on the un-dropped input, DoRA's correction on the dropped one. Gradients
flow to x, A, B, m, a bias that requires grad and a learnable scaling, not through n.
"""

from __future__ import annotations

import math

import torch

from .contract import accumulation_dtype

# Philox4x32 round multipliers and Weyl key increments (Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of the 64-bit product a * b; `b` holds uint32 values in int64."""
    # Split b into 16-bit halves so that no partial product leaves int64.
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    t = a * b_lo  # < 2**48
    u = a * b_hi  # < 2**48; the product is u * 2**16 + t
    lo = (((u & 0xFFFF) << 16) + t) & _MASK32
    hi = (u + (t >> 16)) >> 16
    return hi, lo


def philox4x32_10(
    counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    key: tuple[torch.Tensor | int, torch.Tensor | int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values; returns the four words.

    Counter words broadcast against each other and against the key words.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """T = floor(p * 2**32): a word w keeps its element when w >= T."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must satisfy 0 <= p < 1, got {p!r}")
    # p * 2**32 is exact in float64 (a power-of-two scaling), so int() floors exactly.
    return int(p * 2**32)


def dropout_scale(p: float) -> float:
    """The factor applied to kept elements, 1 / (1 - p), rounded to float32 once."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def _seed_words(seed: int | torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    if isinstance(seed, torch.Tensor):
        seed = seed.to(device=device, dtype=torch.int64)
    else:
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be a 63-bit non-negative integer, got {seed}")
        seed = torch.tensor(seed, dtype=torch.int64, device=device)
    return seed & _MASK32, (seed >> 32) & _MASK32


def dropout_keep_mask(
    seed: int | torch.Tensor,
    M: int,
    K: int,
    p: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The keep mask [M, K] (bool) for dropout probability `p` and a 63-bit `seed`.

    Bit-identical across backends: every kernel regenerates exactly this mask.
    `seed` is a Python int or a 0-dim int64 tensor.
    """
    threshold = dropout_threshold(p)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if threshold == 0:
        return torch.ones(M, K, dtype=torch.bool, device=device)
    groups_per_row = (K + 3) // 4
    q = torch.arange(M * groups_per_row, dtype=torch.int64, device=device)
    zero = torch.zeros_like(q)
    words = philox4x32_10((q & _MASK32, q >> 32, zero, zero), _seed_words(seed, device))
    # [M, groups, 4] -> [M, 4 * groups] -> the first K columns of each row.
    words = torch.stack(words, dim=-1).reshape(M, groups_per_row * 4)[:, :K]
    return words >= threshold


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_keep_mask(keep: torch.Tensor) -> torch.Tensor:
    """The keep mask [M, K] (bool) packed one bit per element: uint8 [M, ceil(K/8)].

    Bit k % 8 of byte [m, k // 8] is keep[m, k]; the padding bits of a row's last byte
    are 0. This is the layout of the forward's `keep_bits` output (docs/backends.md).
    """
    if keep.dim() != 2 or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a 2-D bool tensor, got {keep.dim()}-D {keep.dtype}")
    M, K = keep.shape
    padded = torch.zeros(M, (K + 7) // 8 * 8, dtype=torch.uint8, device=keep.device)
    padded[:, :K] = keep
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=keep.device)
    return (padded.view(M, (K + 7) // 8, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_keep_mask(keep_bits: torch.Tensor, K: int) -> torch.Tensor:
    """The keep mask [M, K] (bool) from its packed form (`pack_keep_mask`)."""
    if keep_bits.dim() != 2 or keep_bits.dtype != torch.uint8:
        raise ValueError(
            f"keep_bits must be a 2-D uint8 tensor, got {keep_bits.dim()}-D {keep_bits.dtype}"
        )
    if keep_bits.shape[1] != (K + 7) // 8:
        raise ValueError(
            f"keep_bits must have ceil(K / 8) = {(K + 7) // 8} columns for K = {K}, "
            f"got {keep_bits.shape[1]}"
        )
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=keep_bits.device)
    bits = (keep_bits.unsqueeze(-1) & weights) != 0
    return bits.reshape(keep_bits.shape[0], keep_bits.shape[1] * 8)[:, :K]


def apply_dropout(x: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
    """D(x) = x * keep / (1 - p); identity when `keep` is None."""
    if keep is None:
        return x
    return x * keep * dropout_scale(p)


def lora_linear_forward_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, U) for a 2-D x [M, K]: the forward as the op's contract shapes it.

    U = D(X) A^T [M, R] is computed in the accumulation dtype (float32, float64 for
    float64 x); Y = X W^T + b + s U B^T [M, N] is in x's dtype, the LoRA term added to
    the base output in the accumulation dtype and rounded once. `keep` is the [M, K]
    bool mask, or None for no dropout.
    """
    acc = accumulation_dtype(x.dtype)
    u = apply_dropout(x.to(acc), keep, dropout_p) @ lora_A.to(acc).t()
    base = torch.nn.functional.linear(x, weight, bias)
    y = base.to(acc) + scaling * (u @ lora_B.to(acc).t())
    return y.to(x.dtype), u


def lora_linear_backward_reference(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    keep: torch.Tensor | None = None,
    *,
    seed: int | torch.Tensor | None = None,
    u: torch.Tensor | None = None,
    need_grad_x: bool = True,
    need_grad_lora: bool = True,
    need_grad_scaling: bool = False,
    need_grad_bias: bool = False,
) -> tuple[torch.Tensor | None, ...]:
    """(grad_x, grad_A, grad_B, grad_scaling, grad_bias) of `lora_linear_forward_reference`.

    grad_y [M, N] and x [M, K] are 2-D. The keep mask is `keep` ([M, K] bool) or, with
    dropout and no `keep`, the mask of `seed`. `u` is the forward's U, recomputed when
    None. A gradient not asked for is None. grad_x and grad_bias come in x's dtype,
    grad_A and grad_B in the adapters', grad_scaling in the accumulation dtype; every
    product accumulates in the accumulation dtype.
    """
    M, K = x.shape
    if dropout_p > 0.0 and keep is None:
        if seed is None:
            raise ValueError("with dropout_p > 0, give the forward's keep mask or its seed")
        keep = dropout_keep_mask(seed, M, K, dropout_p, x.device)
    acc = accumulation_dtype(x.dtype)
    dy = grad_y.to(acc)
    g = dy @ lora_B.to(acc)  # G = dY B  [M, R]
    grad_x = grad_A = grad_B = grad_scaling = grad_bias = None
    if need_grad_x:
        dropped_ga = apply_dropout(g @ lora_A.to(acc), keep, dropout_p)
        grad_x = ((grad_y @ weight).to(acc) + scaling * dropped_ga).to(x.dtype)
    if need_grad_lora or need_grad_scaling:
        dropped_x = apply_dropout(x.to(acc), keep, dropout_p)
        if u is None:
            u = dropped_x @ lora_A.to(acc).t()
        if need_grad_lora:
            grad_A = (scaling * (g.t() @ dropped_x)).to(lora_A.dtype)
            grad_B = (scaling * (dy.t() @ u)).to(lora_B.dtype)
        if need_grad_scaling:
            grad_scaling = (g * u).sum()
    if need_grad_bias:
        grad_bias = grad_y.sum(0, dtype=acc).to(x.dtype)
    return grad_x, grad_A, grad_B, grad_scaling, grad_bias


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Y = X W^T + b + s * (D(X) A^T) B^T with the mask of `dropout_keep_mask(seed, ...)`.

    x [*, K], weight [N, K], bias [N] or None, lora_A [R, K], lora_B [N, R]; returns
    [*, N] in x's dtype. Differentiable with plain autograd in every argument; its
    gradients are those of `lora_linear_backward_reference`. The LoRA branch is
    computed in the accumulation dtype (`lora_linear_forward_reference`).
    """
    K = x.shape[-1]
    M = math.prod(x.shape[:-1])  # not reshape(-1, K): with K == 0 the -1 is ambiguous
    p = dropout_p if training else 0.0
    keep = dropout_keep_mask(seed, M, K, p, x.device) if p > 0 else None
    y, _ = lora_linear_forward_reference(
        x.reshape(M, K), weight, bias, lora_A, lora_B, scaling, p, keep
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])


def dora_weight_norm_reference(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float | torch.Tensor,
) -> torch.Tensor:
    """n = ||W + s B A|| over each output row [N], detached, in the accumulation dtype.

    The direct form, through the [N, K] matrix W + s B A (as peft computes it);
    `lora_kernels.dora.weight_row_norm` gets the same without that temporary.
    """
    acc = accumulation_dtype(weight.dtype)
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.detach().to(acc)
    with torch.no_grad():
        direct = weight.to(acc) + scaling * (lora_B.detach().to(acc) @ lora_A.detach().to(acc))
        return torch.linalg.vector_norm(direct, dim=1)


def dora_linear_forward_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    keep: torch.Tensor | None = None,
    weight_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA's Y [M, N] for a 2-D x [M, K], in x's dtype; differentiable with autograd.

    magnitude m [N]; `keep` is the [M, K] bool mask, or None for no dropout;
    `weight_norm` is n [N] (detached here), the direct `dora_weight_norm_reference`
    when None. The base products X W^T and (X * keep) W^T are those of `F.linear` in
    x's dtype (the dropout scale 1/(1 - p) is applied after the product, so the masked
    input is exact); U, the LoRA term, the scale m/n and the sum are in the accumulation
    dtype, rounded once.
    """
    acc = accumulation_dtype(x.dtype)
    if weight_norm is None:
        weight_norm = dora_weight_norm_reference(weight, lora_A, lora_B, scaling)
    # m/n [N], broadcast over the rows of Y: n is a constant of the graph.
    scale = magnitude.to(acc) / weight_norm.detach().to(acc)
    u = apply_dropout(x.to(acc), keep, dropout_p) @ lora_A.to(acc).t()
    lora = scaling * (u @ lora_B.to(acc).t())
    base = torch.nn.functional.linear(x, weight).to(acc)
    if keep is None:
        y = scale * (base + lora)
    else:
        dropped_base = torch.nn.functional.linear(x * keep, weight).to(acc)
        y = base + (scale - 1) * (dropped_base * dropout_scale(dropout_p)) + scale * lora
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def dora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float | torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = True,
    seed: int | torch.Tensor = 0,
    weight_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA's Y (see the module docstring) with the mask of `dropout_keep_mask(seed, ...)`.

    x [*, K], weight [N, K], bias [N] or None, lora_A [R, K], lora_B [N, R], magnitude
    [N]; returns [*, N] in x's dtype. `weight_norm` as in `dora_linear_forward_reference`.
    """
    K = x.shape[-1]
    M = math.prod(x.shape[:-1])  # not reshape(-1, K): with K == 0 the -1 is ambiguous
    p = dropout_p if training else 0.0
    keep = dropout_keep_mask(seed, M, K, p, x.device) if p > 0 else None
    y = dora_linear_forward_reference(
        x.reshape(M, K), weight, bias, lora_A, lora_B, magnitude, scaling, p, keep, weight_norm
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])
