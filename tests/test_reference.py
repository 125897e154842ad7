"""The reference's Philox generator and dropout mask against independent computations."""

import math

import pytest
import torch

from lora_kernels.reference import (
    dropout_keep_mask,
    dropout_threshold,
    lora_linear_backward_reference,
    lora_linear_reference,
    philox4x32_10,
)


def philox_python(counter, key):
    """Philox4x32-10 on plain Python integers, written from the Random123 paper."""
    c = list(counter)
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [
            (p1 >> 32) ^ c[1] ^ k0,
            p1 & 0xFFFFFFFF,
            (p0 >> 32) ^ c[3] ^ k1,
            p0 & 0xFFFFFFFF,
        ]
        k0 = (k0 + 0x9E3779B9) & 0xFFFFFFFF
        k1 = (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c


# Known-answer vectors of Random123 (kat_vectors), (counter) (key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_philox_matches_random123_known_answers(counter, key, expected):
    c = tuple(torch.tensor(v, dtype=torch.int64) for v in counter)
    k = tuple(torch.tensor(v, dtype=torch.int64) for v in key)
    assert tuple(int(w) for w in philox4x32_10(c, k)) == expected
    assert tuple(philox_python(counter, key)) == expected


def mask_python(seed, M, K, p):
    """The keep mask from docs/design.md's spec, element by element, in plain Python."""
    threshold = math.floor(p * 2**32)
    groups = (K + 3) // 4
    key = (seed & 0xFFFFFFFF, seed >> 32)
    rows = []
    for m in range(M):
        row = []
        for k in range(K):
            q = m * groups + k // 4
            word = philox_python((q & 0xFFFFFFFF, q >> 32, 0, 0), key)[k % 4]
            row.append(word >= threshold)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


@pytest.mark.parametrize(
    "seed,M,K,p",
    [(0, 3, 5, 0.5), (2**62 + 12345, 4, 9, 0.1), (987654321987, 2, 13, 0.9), (7, 5, 4, 0.3)],
    ids=["seed0-M3-K5-p0.5", "seed2^62-M4-K9-p0.1", "seed-big-M2-K13-p0.9", "M5-K4-p0.3"],
)
def test_keep_mask_matches_elementwise_spec(seed, M, K, p):
    expected = mask_python(seed, M, K, p)
    assert torch.equal(dropout_keep_mask(seed, M, K, p), expected)
    # A 0-dim int64 tensor seed names the same mask as the int.
    assert torch.equal(dropout_keep_mask(torch.tensor(seed), M, K, p), expected)


def test_keep_mask_rows_start_on_fresh_counter():
    # K = 5: row 1 must start at q = 2 (ceil(5/4) = 2), not at element 5 of row 0.
    seed, K = 99, 5
    mask_row1 = dropout_keep_mask(seed, 2, K, 0.5)[1]
    words = philox_python((2, 0, 0, 0), (seed, 0)) + philox_python((3, 0, 0, 0), (seed, 0))
    assert mask_row1.tolist() == [w >= 2**31 for w in words[:K]]


def test_philox_counter_carries_the_high_32_bits_of_q():
    # Rows past 2**32 / ceil(K/4) put hi32(q) in the second counter word.
    seed, q = 5, 2**32 + 3
    qt = torch.tensor(q, dtype=torch.int64)
    zero = torch.zeros((), dtype=torch.int64)
    out = philox4x32_10((qt & 0xFFFFFFFF, qt >> 32, zero, zero), (torch.tensor(seed), zero))
    assert [int(w) for w in out] == philox_python((3, 1, 0, 0), (seed, 0))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    M, K = 256, 257
    keep = dropout_keep_mask(1234, M, K, p).double().mean().item()
    n = M * K
    # Five standard deviations of a binomial proportion.
    assert abs(keep - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


def test_different_seeds_give_different_masks():
    assert not torch.equal(dropout_keep_mask(1, 16, 33, 0.5), dropout_keep_mask(2, 16, 33, 0.5))


def test_p_zero_keeps_everything():
    assert dropout_keep_mask(3, 7, 9, 0.0).all()
    assert dropout_threshold(0.0) == 0
    assert dropout_threshold(0.5) == 2**31


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_threshold_rejects_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match="dropout_p"):
        dropout_threshold(p)


def test_reference_equals_plain_formula():
    g = torch.Generator().manual_seed(0)
    M, K, N, R, p, s, seed = 6, 10, 5, 3, 0.25, 0.5, 42
    x, W, b = (
        torch.randn(M, K, generator=g),
        torch.randn(N, K, generator=g),
        torch.randn(N, generator=g),
    )
    A, B = torch.randn(R, K, generator=g), torch.randn(N, R, generator=g)
    keep = mask_python(seed, M, K, p)
    expected = x @ W.t() + b + s * ((x * keep / (1 - p)) @ A.t()) @ B.t()
    out = lora_linear_reference(x, W, b, A, B, s, p, seed=seed)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # Eval mode: no dropout at all.
    out_eval = lora_linear_reference(x, W, b, A, B, s, p, training=False, seed=seed)
    torch.testing.assert_close(
        out_eval, x @ W.t() + b + s * (x @ A.t()) @ B.t(), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["p0", "p0.3"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "shape", [(7, 13, 5, 3), (33, 70, 21, 16)], ids=lambda s: "M{}-K{}-N{}-R{}".format(*s)
)
def test_backward_reference_matches_autograd_of_the_forward_reference(shape, bias, p):
    """The backward formula, written out, equals autograd through the forward formula
    in float64, for every gradient, with the same keep mask."""
    M, K, N, R = shape
    g = torch.Generator().manual_seed(M * K + N * R)

    def rand(*size):
        return torch.randn(*size, generator=g, dtype=torch.float64)

    x, W, A, B = rand(M, K).requires_grad_(), rand(N, K), rand(R, K), rand(N, R)
    A.requires_grad_(), B.requires_grad_()
    b = rand(N).requires_grad_() if bias else None
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    seed = 314159
    y = lora_linear_reference(x, W, b, A, B, s, p, seed=seed)
    grad_y = rand(M, N)
    wrt = [t for t in (x, A, B, s, b) if t is not None]
    expected = torch.autograd.grad(y, wrt, grad_y)
    keep = dropout_keep_mask(seed, M, K, p) if p > 0 else None
    with torch.no_grad():
        grads = lora_linear_backward_reference(
            grad_y, x, W, A, B, s, p, keep,
            need_grad_scaling=True, need_grad_bias=bias,
        )  # fmt: skip
        from_seed = lora_linear_backward_reference(
            grad_y, x, W, A, B, s, p, seed=seed,
            need_grad_scaling=True, need_grad_bias=bias,
        )  # fmt: skip
    got = [t for t in grads if t is not None]
    assert len(got) == len(expected)
    for name, out, ref in zip(["x", "A", "B", "scaling", "bias"], got, expected, strict=False):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=name)
    for a, c in zip(grads, from_seed, strict=True):
        assert (a is None and c is None) or torch.equal(a, c)


def test_backward_reference_returns_only_what_is_asked():
    x, W, A, B = torch.randn(4, 6), torch.randn(3, 6), torch.randn(2, 6), torch.randn(3, 2)
    grads = lora_linear_backward_reference(
        torch.randn(4, 3), x, W, A, B, 0.5, need_grad_x=False, need_grad_lora=False
    )
    assert grads == (None, None, None, None, None)
    with pytest.raises(ValueError, match="keep mask or its seed"):
        lora_linear_backward_reference(torch.randn(4, 3), x, W, A, B, 0.5, 0.1)
