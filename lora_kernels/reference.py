"""The ground truth: the LoRA linear op and its dropout mask in plain PyTorch.

Written for clarity, not speed. Every backend is tested against this module, so it
follows the design notes literally:

    D(X) = X * keep / (1 - p)
    U    = D(X) A^T                      [M, R]
    Y    = X W^T + b + s * U B^T         [M, N]

and the keep mask is Philox4x32-10 (Salmon et al., SC'11; the same generator as
`triton.language.randint4x`), one call per four elements of a row:

    q       = m * ceil(K / 4) + k // 4        (64-bit counter)
    counter = (lo32(q), hi32(q), 0, 0)
    key     = (lo32(seed), hi32(seed))
    word    = philox(counter, key)[k % 4]
    keep    = word >= floor(p * 2**32)        (unsigned compare)
"""

from __future__ import annotations

import math

import torch

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
    [*, N] in x's dtype. Differentiable with plain autograd in every argument. The
    LoRA branch is computed in the promoted dtype of x and the adapters (float32
    adapters on a bf16 layer compute the branch in float32, as peft does).
    """
    K = x.shape[-1]
    M = math.prod(x.shape[:-1])  # not reshape(-1, K): with K == 0 the -1 is ambiguous
    x2d = x.reshape(M, K)
    p = dropout_p if training else 0.0
    keep = dropout_keep_mask(seed, M, K, p, x.device) if p > 0 else None
    base = torch.nn.functional.linear(x2d, weight, bias)
    branch_dtype = torch.promote_types(x.dtype, lora_A.dtype)
    u = apply_dropout(x2d.to(branch_dtype), keep, p) @ lora_A.to(branch_dtype).t()
    delta = scaling * (u @ lora_B.to(branch_dtype).t())
    y = base + delta.to(base.dtype)
    return y.reshape(*x.shape[:-1], weight.shape[0])
