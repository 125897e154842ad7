"""The "triton" backend against the float64 reference.

On a machine without CUDA every test runs the kernels on CPU tensors under
TRITON_INTERPRET=1 (set here before anything imports Triton); on a GPU the same tests
run natively. Every buffer the backend allocates is poisoned with NaN (see
`poisoned_empty`), so an element a kernel never writes fails the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DTYPE_IDS, REL_TOL, assert_close, rel_error

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lora_kernels  # noqa: E402
from lora_kernels import ops, reference  # noqa: E402

bt = pytest.importorskip("lora_kernels.backend_triton", reason="Triton is not installed")
import triton  # noqa: E402

from lora_kernels.backend_triton import configs, interpreter, launch  # noqa: E402

USABLE, WHY = bt.availability("triton")
pytestmark = [
    pytest.mark.skipif(not USABLE, reason=f"triton backend not usable: {WHY}"),
    pytest.mark.usefixtures("poisoned_empty"),
]
DEVICE = torch.device("cuda" if torch.cuda.is_available() and not interpreter.ACTIVE else "cpu")
REPO = Path(__file__).resolve().parents[1]


def make_inputs(
    M, K, N, R, dtype, lora_dtype=None, bias=True, learnable_s=True, layout="2d", seed=0
):
    """x [M, K] (or [2, M, K] for "3d"; strided for "strided"; a transpose for
    "transposed"), W, b, A, B and s, random (never zero), on DEVICE."""
    g = torch.Generator().manual_seed(seed + 1000 * M + 100 * K + 10 * N + R)
    lora_dtype = lora_dtype or dtype

    def rand(*shape, dt=dtype, scale=1.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
        return t.to(dt).to(DEVICE)

    if layout == "3d":
        x = rand(2, M, K)
    elif layout == "strided":  # every other column of a wider tensor: strides (2K, 2)
        x = rand(M, 2 * K)[:, ::2]
    elif layout == "transposed":  # strides (1, M)
        x = rand(K, M).t()
    else:
        x = rand(M, K)
    x.requires_grad_()
    weight = rand(N, K, scale=max(K, 1) ** -0.5)
    b = rand(N).requires_grad_() if bias else None
    lora_A = rand(R, K, dt=lora_dtype, scale=max(K, 1) ** -0.5).requires_grad_()
    lora_B = rand(N, R, dt=lora_dtype, scale=R**-0.5).requires_grad_()
    if learnable_s:
        s = torch.tensor(0.75, device=DEVICE, requires_grad=True)
    else:
        s = 0.75
    return x, weight, b, lora_A, lora_B, s


def _differentiable(*tensors):
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


def run_triton(x, weight, b, lora_A, lora_B, s, p, grad_y, draw=7):
    """Output and gradients of lora_linear(backend="triton"), and the seed it drew."""
    torch.manual_seed(draw)
    seed = ops.draw_seed(x.device) if p > 0 else torch.zeros((), dtype=torch.int64)
    torch.manual_seed(draw)
    y = lora_kernels.lora_linear(x, weight, b, lora_A, lora_B, s, p, backend="triton")
    inputs = _differentiable(x, b, lora_A, lora_B, s)
    grads = torch.autograd.grad(y, inputs, grad_y) if inputs else ()
    return y, grads, seed


def run_reference(x, weight, b, lora_A, lora_B, s, p, seed, grad_y):
    """Output and gradients of the float64 reference on the same (rounded) inputs."""

    def up(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().double().requires_grad_(t.requires_grad)

    args = [up(t) for t in (x, weight, b, lora_A, lora_B, s)]
    y = reference.lora_linear_reference(*args, dropout_p=p, seed=seed.cpu())
    inputs = _differentiable(args[0], args[2], args[3], args[4], args[5])
    grads = torch.autograd.grad(y, inputs, grad_y.double()) if inputs else ()
    return y, grads


def check_against_reference(M, K, N, R, dtype, lora_dtype, p, bias, learnable_s, layout):
    x, weight, b, lora_A, lora_B, s = make_inputs(
        M, K, N, R, dtype, lora_dtype, bias, learnable_s, layout
    )
    g = torch.Generator().manual_seed(99)
    shape = (*x.shape[:-1], N)
    grad_y = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    y, grads, seed = run_triton(x, weight, b, lora_A, lora_B, s, p, grad_y)
    y_ref, grads_ref = run_reference(x, weight, b, lora_A, lora_B, s, p, seed, grad_y)

    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    inputs = _differentiable(x, b, lora_A, lora_B, s)
    labels = {id(x): "dX", id(lora_A): "dA", id(lora_B): "dB", id(s): "ds", id(b): "db"}
    for t, grad, grad_ref in zip(inputs, grads, grads_ref, strict=True):
        assert grad.dtype == t.dtype, f"{labels[id(t)]} dtype {grad.dtype} != {t.dtype}"
        if t is s:
            assert_inner_product_close(grad, grad_ref, x, lora_A, lora_B, grad_y, p, seed, dtype)
        else:
            assert_close(grad, grad_ref, dtype, labels[id(t)])


def assert_inner_product_close(ds, ds_ref, x, lora_A, lora_B, grad_y, p, seed, dtype):
    """ds = sum(G * U) is an inner product that may cancel: its error is measured against
    ||G|| ||U|| (the scale of its rounding errors), not against |ds|."""
    K = x.shape[-1]
    x64 = x.detach().double().cpu().reshape(-1, K)
    keep = reference.dropout_keep_mask(seed.cpu(), x64.shape[0], K, p) if p > 0 else None
    u = reference.apply_dropout(x64, keep, p) @ lora_A.detach().double().cpu().t()
    g = grad_y.double().cpu().reshape(-1, grad_y.shape[-1]) @ lora_B.detach().double().cpu()
    err = abs(float(ds) - float(ds_ref)) / float(g.norm() * u.norm())
    assert err <= REL_TOL[dtype], f"ds: error {err:.2e} of ||G|| ||U|| > {REL_TOL[dtype]:.0e}"


# (M, K, N, R, dtype, lora dtype, p, bias, learnable s, x layout): every dtype with every
# p; R in {1, 7, 16, 64, 256}; odd M, K, N; bias on and off; float32 adapters with half
# x; 3-D, strided and transposed x. R <= 16 takes the fused dB path, R > 16 the split one.
CASES = [
    (63, 70, 33, 7, torch.float32, None, 0.1, True, True, "2d"),
    (129, 70, 33, 64, torch.float32, None, 0.5, False, False, "2d"),
    (1, 70, 33, 1, torch.float32, None, 0.0, True, True, "2d"),
    (63, 70, 33, 16, torch.float32, None, 0.5, True, True, "strided"),
    (33, 63, 129, 7, torch.float32, None, 0.1, True, True, "transposed"),
    (63, 70, 33, 16, torch.float16, None, 0.0, True, True, "2d"),
    (33, 70, 33, 7, torch.float16, None, 0.1, False, True, "3d"),
    (63, 70, 33, 64, torch.float16, None, 0.5, True, False, "2d"),
    (63, 70, 33, 16, torch.float16, torch.float32, 0.1, True, True, "2d"),
    (129, 70, 33, 16, torch.bfloat16, None, 0.1, True, True, "2d"),
    (63, 70, 33, 1, torch.bfloat16, None, 0.5, False, True, "2d"),
    (1, 70, 33, 64, torch.bfloat16, None, 0.0, True, True, "2d"),
    (63, 70, 33, 7, torch.bfloat16, torch.float32, 0.1, True, True, "strided"),
    (33, 70, 33, 16, torch.bfloat16, None, 0.5, True, True, "3d"),
    (17, 36, 20, 256, torch.float32, None, 0.1, True, True, "2d"),
]


def case_id(case):
    M, K, N, R, dtype, lora_dtype, p, bias, learnable_s, layout = case
    parts = [f"M{M}", f"K{K}", f"N{N}", f"R{R}", DTYPE_IDS[dtype]]
    if lora_dtype is not None and lora_dtype != dtype:
        parts.append(f"{DTYPE_IDS[lora_dtype]}-adapters")
    parts += [f"p{p}", "bias" if bias else "nobias", "learned-s" if learnable_s else "const-s"]
    if layout != "2d":
        parts.append(layout)
    return "-".join(parts)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_output_and_gradients_match_reference(case):
    check_against_reference(*case)


# The full grid on one odd shape: every dtype x p x bias x R (slow: `make test-long`).
GRID = [
    (63, 70, 33, R, dtype, None, p, bias, True, "2d")
    for dtype in (torch.float32, torch.float16, torch.bfloat16)
    for p in (0.0, 0.1, 0.5)
    for bias in (True, False)
    for R in (1, 7, 16, 64)
]


@pytest.mark.slow
@pytest.mark.parametrize("case", GRID, ids=[case_id(c) for c in GRID])
def test_output_and_gradients_match_reference_grid(case):
    check_against_reference(*case)


# --------------------------------------------------------------------------------------
# The dropout mask
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "M,K,p,seed",
    [
        (1, 1, 0.5, 0),
        (63, 70, 0.1, 2**40 + 123),  # the seed's high word matters
        (17, 33, 0.5, 2**62 + 5),  # T = 2^31: the uint32 compare
        (33, 8, 0.9, 123456789),
        (5, 3, 1e-9, 42),  # T = 4: almost nothing dropped
        (40, 129, 0.999, 7),
        (9, 13, 0.0, 3),
    ],
)
def test_keep_mask_is_bit_identical_to_reference(M, K, p, seed):
    seed_t = torch.tensor(seed, dtype=torch.int64, device=DEVICE)
    keep = launch.keep_mask_bytes(seed_t, M, K, p)
    assert set(keep.unique().tolist()) <= {0, 1}, "unwritten or non-boolean mask bytes"
    expected = reference.dropout_keep_mask(seed, M, K, p)
    assert torch.equal(keep.cpu().bool(), expected)
    assert torch.equal(bt.dropout_keep_mask(seed_t, M, K, p).cpu(), expected)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_shrink_dx_and_da_kernels_use_the_reference_mask(p):
    """With x of ones and identity (or all-ones) operands the kernels' outputs spell out
    the keep mask: U = D(1) I = keep / (1 - p); dX = s D(G A) with G = dY B = I and A of
    ones; dA = s G^T D(1) with G = I."""
    n = 18  # M = N = R = K, odd-sized for the tiles, not a multiple of 4
    seed = torch.tensor(2**33 + 17, dtype=torch.int64, device=DEVICE)
    eye = torch.eye(n, device=DEVICE)
    x = torch.ones(n, n, device=DEVICE)
    zeros = torch.zeros(n, n, device=DEVICE)
    s = torch.tensor(0.5, device=DEVICE)
    scale = reference.dropout_scale(p)
    keep = reference.dropout_keep_mask(seed.cpu(), n, n, p)

    _, u, keep_bits = torch.ops.lora_kernels.triton_forward(x, zeros, None, eye, eye, s, p, seed)
    assert torch.equal(u.cpu(), keep * scale)
    assert torch.equal(keep_bits.cpu(), reference.pack_keep_mask(keep.bool()))

    grad_x, grad_A, grad_B, _, _ = torch.ops.lora_kernels.triton_backward(
        eye, x, zeros, x, eye, s, p, seed, u, keep_bits, True, True, False, False
    )
    assert torch.equal(grad_x.cpu(), keep * (0.5 * scale))
    assert torch.equal(grad_A.cpu(), keep * (0.5 * scale))
    assert torch.equal(grad_B.cpu(), 0.5 * u.cpu())  # dB = s dY^T U with dY = I


# (M, K, R, p, seed): K = 1, 7, 9, 70, 129 (padding bits in the last byte of a row, or
# none: K = 8, 16), M across several row tiles, R over two R-tiles (the interpreter's
# tiles are 32 wide: only one program of an M-tile may write its bits), p from almost
# nothing dropped (T = 0 below 2^-32: all ones) to almost everything.
BITS_CASES = [
    (5, 1, 3, 0.5, 11),
    (17, 7, 40, 0.1, 2**40 + 123),
    (33, 9, 7, 0.5, 2**62 + 5),
    (3, 8, 1, 0.3, 99),
    (21, 16, 33, 0.9, 7),
    (37, 70, 7, 0.1, 123456789),
    (9, 129, 40, 0.999, 3),
    (13, 70, 2, 1e-12, 42),
]


@pytest.mark.parametrize(
    "M,K,R,p,seed", BITS_CASES, ids=[f"M{c[0]}-K{c[1]}-R{c[2]}-p{c[3]}" for c in BITS_CASES]
)
def test_forward_keep_bits_are_the_packed_reference_mask(M, K, R, p, seed):
    """The shrink's keep_bits (and the bits-only kernel's, what backward makes when given
    none) equal pack_keep_mask of the reference mask bit for bit, padding bits 0; every
    byte is written (the buffers start as 0xFF)."""
    x, weight, b, lora_A, lora_B, s = make_inputs(M, K, 6, R, torch.float32)
    seed_t = torch.tensor(seed, dtype=torch.int64, device=DEVICE)
    with torch.no_grad():
        _, _, keep_bits = torch.ops.lora_kernels.triton_forward(
            x, weight, b, lora_A, lora_B, s, p, seed_t
        )
    expected = reference.pack_keep_mask(reference.dropout_keep_mask(seed, M, K, p))
    assert keep_bits.dtype == torch.uint8 and keep_bits.shape == (M, (K + 7) // 8)
    assert torch.equal(keep_bits.cpu(), expected)
    assert torch.equal(launch.keep_mask_bits(seed_t, M, K, p).cpu(), expected)


def test_forward_without_dropout_returns_empty_bits():
    x, weight, b, lora_A, lora_B, s = make_inputs(9, 13, 6, 3, torch.float32)
    seed = torch.tensor(1, dtype=torch.int64, device=DEVICE)
    with torch.no_grad():
        _, _, keep_bits = torch.ops.lora_kernels.triton_forward(
            x, weight, b, lora_A, lora_B, s, 0.0, seed
        )
    assert keep_bits.dtype == torch.uint8 and keep_bits.shape == (0,)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_backward_applies_the_bits_it_is_given(p):
    """Given the complement of the forward's bits, dX and dA apply the complement: the
    kernels read keep_bits, not the seed. With x of ones, dY = B = I (so G = I) and A of
    ones: dX = s D(G A) and dA = s G^T D(X) both spell out the mask times s / (1 - p)."""
    n, K = 13, 21  # M = N = R = n; K not a multiple of 8
    seed = torch.tensor(2**33 + 5, dtype=torch.int64, device=DEVICE)
    eye = torch.eye(n, device=DEVICE)
    x = torch.ones(n, K, device=DEVICE)
    ones_a = torch.ones(n, K, device=DEVICE)
    zeros_w = torch.zeros(n, K, device=DEVICE)
    s = torch.tensor(0.5, device=DEVICE)
    keep = reference.dropout_keep_mask(seed.cpu(), n, K, p)
    factor = 0.5 * reference.dropout_scale(p)

    _, u, keep_bits = torch.ops.lora_kernels.triton_forward(
        x, zeros_w, None, ones_a, eye, s, p, seed
    )
    for bits, mask in [(keep_bits, keep), (reference.pack_keep_mask(~keep).to(DEVICE), ~keep)]:
        grad_x, grad_A, _, _, _ = torch.ops.lora_kernels.triton_backward(
            eye, x, zeros_w, ones_a, eye, s, p, seed, u, bits, True, True, False, False
        )
        assert torch.equal(grad_x.cpu(), mask * factor)
        assert torch.equal(grad_A.cpu(), mask * factor)


@pytest.mark.parametrize(
    "dtype,p", [(torch.float32, 0.1), (torch.bfloat16, 0.5)], ids=["fp32-p0.1", "bf16-p0.5"]
)
def test_backward_without_bits_equals_backward_with_the_forwards_bits(dtype, p):
    """An empty keep_bits with p > 0 (a direct op call): the launcher makes the bits from
    the seed, and every gradient is bit-identical to the one from the forward's bits."""
    M, K, N, R = 33, 70, 33, 40
    x, weight, b, lora_A, lora_B, s = make_inputs(M, K, N, R, dtype)
    seed = torch.tensor(2**41 + 3, dtype=torch.int64, device=DEVICE)
    grad_y = torch.randn(M, N, generator=torch.Generator().manual_seed(4)).to(dtype).to(DEVICE)
    args = [t.detach() for t in (x, weight, lora_A, lora_B, s)]
    _, u, keep_bits = torch.ops.lora_kernels.triton_forward(
        args[0], weight, b.detach(), *args[2:], p, seed
    )
    no_bits = torch.empty(0, dtype=torch.uint8, device=DEVICE)
    outs = [
        torch.ops.lora_kernels.triton_backward(
            grad_y, *args[:5], p, seed, u, bits, True, True, True, True
        )
        for bits in (keep_bits, no_bits)
    ]
    for with_bits, without in zip(*outs, strict=True):
        assert with_bits.numel() > 0 and torch.equal(with_bits, without)


def test_backward_rejects_bits_of_the_wrong_shape():
    x, weight, b, lora_A, lora_B, s, p, seed = _op_args()
    _, u, keep_bits = torch.ops.lora_kernels.triton_forward(
        x, weight, b, lora_A, lora_B, s, p, seed
    )
    grad_y = torch.ones(x.shape[0], weight.shape[0], device=DEVICE)
    for bad in (keep_bits[:, :-1], keep_bits.to(torch.int8), keep_bits[:-1]):
        with pytest.raises((ValueError, TypeError), match="keep_bits"):
            torch.ops.lora_kernels.triton_backward(
                grad_y, x, weight, lora_A, lora_B, s, p, seed, u, bad, True, True, False, False
            )


def test_same_seed_is_bit_identical_and_different_seeds_differ():
    x, weight, b, lora_A, lora_B, s = make_inputs(33, 70, 33, 7, torch.float32)
    grad_y = torch.randn(33, 33, device=DEVICE)
    y1, grads1, seed1 = run_triton(x, weight, b, lora_A, lora_B, s, 0.5, grad_y, draw=1)
    y2, grads2, _ = run_triton(x, weight, b, lora_A, lora_B, s, 0.5, grad_y, draw=1)
    assert torch.equal(y1, y2)
    for g1, g2 in zip(grads1, grads2, strict=True):
        assert torch.equal(g1, g2)

    y3, _, seed3 = run_triton(x, weight, b, lora_A, lora_B, s, 0.5, grad_y, draw=2)
    assert seed1 != seed3
    mask1 = bt.dropout_keep_mask(seed1.to(DEVICE), 33, 70, 0.5)
    mask3 = bt.dropout_keep_mask(seed3.to(DEVICE), 33, 70, 0.5)
    assert not torch.equal(mask1, mask3)
    assert not torch.equal(y1, y3)


# --------------------------------------------------------------------------------------
# Derivatives, flags, shapes
# --------------------------------------------------------------------------------------


def test_directional_derivative_matches_finite_differences_fp32():
    """The backend takes no float64, so gradcheck becomes a central difference of
    f = <dY, Y> along a random direction, in float32, seed fixed, dropout on."""
    M, K, N, R, p = 33, 40, 24, 7, 0.5
    x, weight, b, lora_A, lora_B, _ = make_inputs(M, K, N, R, torch.float32)
    s = torch.tensor(0.75, device=DEVICE, requires_grad=True)
    seed = torch.tensor(2**35 + 9, dtype=torch.int64, device=DEVICE)
    g = torch.Generator().manual_seed(5)
    grad_y = torch.randn(M, N, generator=g).to(DEVICE)
    params = [x, b, lora_A, lora_B, s]
    direction = [torch.randn(t.shape, generator=g).to(DEVICE) for t in params]

    def f(values):
        xv, bv, av, bbv, sv = values
        y, _, _ = torch.ops.lora_kernels.triton_forward(xv, weight, bv, av, bbv, sv, p, seed)
        return (grad_y.double() * y.double()).sum()

    y, _, _ = torch.ops.lora_kernels.triton_forward(x, weight, b, lora_A, lora_B, s, p, seed)
    grads = torch.autograd.grad(y, params, grad_y)
    analytic = sum(
        float((gr.double() * d.double()).sum()) for gr, d in zip(grads, direction, strict=True)
    )

    eps = 1e-2
    with torch.no_grad():
        plus = f([t + eps * d for t, d in zip(params, direction, strict=True)])
        minus = f([t - eps * d for t, d in zip(params, direction, strict=True)])
    numeric = float(plus - minus) / (2 * eps)
    assert abs(analytic - numeric) <= 2e-3 * abs(numeric), (analytic, numeric)


@pytest.mark.parametrize(
    "frozen", ["x", "adapters", "all-but-bias", "nothing"], ids=lambda f: f"frozen-{f}"
)
def test_only_requested_gradients_are_computed(frozen):
    M, K, N, R, p = 33, 70, 33, 16, 0.1
    x, weight, b, lora_A, lora_B, s = make_inputs(M, K, N, R, torch.float32)
    if frozen in ("x", "all-but-bias"):
        x.requires_grad_(False)
    if frozen in ("adapters", "all-but-bias"):
        lora_A.requires_grad_(False)
        lora_B.requires_grad_(False)
        s.requires_grad_(False)
    grad_y = torch.randn(M, N, device=DEVICE)
    y, grads, seed = run_triton(x, weight, b, lora_A, lora_B, s, p, grad_y)
    y_ref, grads_ref = run_reference(x, weight, b, lora_A, lora_B, s, p, seed, grad_y)
    assert len(grads) == len(grads_ref)
    assert_close(y, y_ref, torch.float32, "y")
    for grad, grad_ref in zip(grads, grads_ref, strict=True):
        assert_close(grad, grad_ref, torch.float32, "grad")

    # The op itself returns empty tensors for what was not asked for.
    _, u, bits = torch.ops.lora_kernels.triton_forward(x, weight, b, lora_A, lora_B, s, p, seed)
    need_x, need_lora = x.requires_grad, lora_A.requires_grad
    outs = torch.ops.lora_kernels.triton_backward(
        grad_y, x, weight, lora_A, lora_B, s.detach(), p, seed, u, bits, need_x, need_lora,
        False, True,
    )  # fmt: skip
    for out, flag in zip(outs, (need_x, need_lora, need_lora, False, True), strict=True):
        assert (out.numel() > 0) == flag


def test_float32_adapters_with_bf16_x_keep_their_dtypes():
    x, weight, b, lora_A, lora_B, s = make_inputs(17, 40, 24, 7, torch.bfloat16, torch.float32)
    seed = torch.tensor(3, dtype=torch.int64, device=DEVICE)
    y, u, bits = torch.ops.lora_kernels.triton_forward(x, weight, b, lora_A, lora_B, s, 0.1, seed)
    assert (y.dtype, u.dtype, bits.dtype) == (torch.bfloat16, torch.float32, torch.uint8)
    grads = torch.ops.lora_kernels.triton_backward(
        torch.ones_like(y), x, weight, lora_A, lora_B, s, 0.1, seed, u, bits,
        True, True, True, True,
    )  # fmt: skip
    dtypes = [t.dtype for t in grads]
    assert dtypes == [torch.bfloat16, torch.float32, torch.float32, torch.float32, torch.bfloat16]
    assert grads[0].is_contiguous()


@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["M0", "2x0"])
def test_empty_input_returns_empty_output_and_zero_gradients_without_launching(lead, monkeypatch):
    def no_launch(kernel):
        raise AssertionError(f"launched {kernel} for an empty input")

    monkeypatch.setattr(launch, "wrap_triton", no_launch)
    K, N, R = 20, 12, 4
    x, weight, b, lora_A, lora_B, s = make_inputs(1, K, N, R, torch.float32)
    x = torch.zeros(*lead, K, device=DEVICE, requires_grad=True)
    y = lora_kernels.lora_linear(x, weight, b, lora_A, lora_B, s, 0.1, backend="triton")
    assert y.shape == (*lead, N)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in (b, lora_A, lora_B, s):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("K,N", [(0, 12), (20, 0)], ids=["K0", "N0"])
def test_zero_features_match_reference(K, N):
    """Called as ops (lora_linear's reshape of x rejects K = 0 before any backend runs)."""
    M, R, p = 9, 3, 0.1
    x, weight, b, lora_A, lora_B, s = make_inputs(M, K, N, R, torch.float32)
    seed = torch.tensor(5, dtype=torch.int64, device=DEVICE)
    grad_y = torch.randn(M, N, device=DEVICE)
    y, u, bits = torch.ops.lora_kernels.triton_forward(x, weight, b, lora_A, lora_B, s, p, seed)
    grads = torch.ops.lora_kernels.triton_backward(
        grad_y, x, weight, lora_A, lora_B, s, p, seed, u, bits, True, True, True, True
    )
    if K > 0:
        y_ref, (gx, gb, gA, gB, gs) = run_reference(
            x, weight, b, lora_A, lora_B, s, p, seed, grad_y
        )
    else:  # (the reference's reshape rejects K = 0 too) U = 0, so Y = b and dB = ds = 0
        y_ref, gb = b.detach().double().expand(M, N), grad_y.double().sum(0)
        gx, gA = torch.zeros(M, 0).double(), torch.zeros(R, 0).double()
        gB, gs = torch.zeros(N, R).double(), torch.zeros(()).double()
    for out, ref in zip((y, *grads), (y_ref, gx, gA, gB, gs, gb), strict=True):
        assert out.shape == ref.shape and torch.allclose(out.double().cpu(), ref)


def test_backward_keeps_only_x_u_the_seed_and_the_bits():
    """Saved activations are bytes(x) + bytes(U) + the 1-bit mask (+ the 0-dim seed and
    s); x is the caller's tensor, not a copy; no byte mask and no upcast x, bf16 x with
    fp32 adapters."""
    M, K, N, R = 64, 256, 48, 16
    x, weight, b, lora_A, lora_B, _ = make_inputs(M, K, N, R, torch.bfloat16, torch.float32)
    params = {t.data_ptr() for t in (weight, b, lora_A, lora_B)}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_kernels.lora_linear(x, weight, b, lora_A, lora_B, 2.0, 0.1, backend="triton")
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    x_bytes = x.numel() * x.element_size()
    bits_bytes = M * ((K + 7) // 8)  # the packed keep mask, one bit per element
    assert saved_bytes <= x_bytes + M * R * 4 + bits_bytes + 8 + 4, [
        (t.shape, t.dtype) for t in saved
    ]
    assert any(t.data_ptr() == x.data_ptr() and t.dtype == x.dtype for t in saved)
    y.sum().backward()


# --------------------------------------------------------------------------------------
# Errors, availability, compile-friendliness
# --------------------------------------------------------------------------------------


def _op_args(**changes):
    x, weight, b, lora_A, lora_B, _ = make_inputs(9, 12, 10, 4, torch.float32)
    args = {
        "x": x.detach(),
        "weight": weight,
        "bias": b.detach(),
        "lora_A": lora_A.detach(),
        "lora_B": lora_B.detach(),
        "scaling": torch.tensor(0.5, device=DEVICE),
        "dropout_p": 0.1,
        "seed": torch.tensor(1, dtype=torch.int64, device=DEVICE),
    }
    args.update(changes)
    return list(args.values())


@pytest.mark.parametrize(
    "changes,error,words",
    [
        ({"x": torch.zeros(9, 12, dtype=torch.float64)}, TypeError, ["x", "float64"]),
        ({"x": torch.zeros(9, 3, 4)}, ValueError, ["x", "2-D"]),
        ({"weight": torch.zeros(10, 12, dtype=torch.float16)}, TypeError, ["weight", "float16"]),
        ({"lora_B": torch.zeros(10, 5)}, ValueError, ["lora_B", "[10, 4]", "[10, 5]"]),
        ({"lora_A": torch.zeros(4, 12, dtype=torch.bfloat16)}, TypeError, ["lora_A"]),
        ({"bias": torch.zeros(11)}, ValueError, ["bias", "[10]", "[11]"]),
        ({"scaling": torch.tensor(0.5, dtype=torch.float64)}, TypeError, ["scaling"]),
        ({"seed": torch.tensor(1, dtype=torch.int32)}, TypeError, ["seed", "int32"]),
        ({"dropout_p": 1.0}, ValueError, ["dropout_p", "1.0"]),
    ],
    ids=["x-fp64", "x-3d", "weight-dtype", "B-shape", "A-dtype", "bias-shape", "s-fp64",
         "seed-int32", "p-1"],
)  # fmt: skip
def test_bad_inputs_raise_naming_the_argument(changes, error, words):
    args = _op_args(**{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in changes.items()})
    with pytest.raises(error) as info:
        torch.ops.lora_kernels.triton_forward(*args)
    for word in words:
        assert word in str(info.value)


def test_interpreter_makes_the_backend_usable_on_cpu():
    if DEVICE.type != "cpu":
        pytest.skip("runs natively on this machine's GPU; the interpreter is not in use")
    usable, reason = lora_kernels.available_backends()["triton"]
    assert usable, reason
    assert "TRITON_INTERPRET" in reason
    assert bt.serves("triton", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_without_interpreter_explicit_triton_on_cpu_raises_with_the_reason():
    code = (
        "import torch, lora_kernels\n"
        "x = torch.randn(4, 8); w = torch.randn(6, 8)\n"
        "a = torch.randn(2, 8); b = torch.randn(6, 2)\n"
        "try:\n"
        "    lora_kernels.lora_linear(x, w, None, a, b, 1.0, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert "RAISED" in out.stdout, out.stdout + out.stderr
    assert "triton" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_setting_triton_interpret_after_import_raises_saying_it_was_too_late():
    """The kernels are defined (compiled or interpreted) at import: TRITON_INTERPRET=1 set
    afterwards cannot make CPU tensors usable, and both the backend's availability and
    the op say why, naming the variable and that it must be set before the import."""
    code = (
        "import os, torch, lora_kernels\n"
        "from lora_kernels.backend_triton import availability\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "print('AVAILABLE', availability('triton'))\n"
        "x = torch.randn(4, 8); w = torch.randn(6, 8)\n"
        "a = torch.randn(2, 8); b = torch.randn(6, 2)\n"
        "s = torch.tensor(1.0); seed = torch.tensor(0)\n"
        "try:\n"
        "    torch.ops.lora_kernels.triton_forward(x, w, None, a, b, s, 0.0, seed)\n"
        "except ValueError as e:\n"
        "    print('RAISED', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert "RAISED" in lines and "AVAILABLE" in lines, out.stdout + out.stderr
    for line in (lines["AVAILABLE"], lines["RAISED"]):
        assert "TRITON_INTERPRET=1 was set after lora_kernels was imported" in line
        assert "set it before importing lora_kernels" in line
    assert lines["AVAILABLE"].startswith("(False,")
    assert "x must be a CUDA tensor for the triton backend" in lines["RAISED"]


def test_ops_pass_opcheck_schema_autograd_and_fake_tensor_checks():
    """What can be checked without a GPU of the op's torch.compile support: its schema,
    autograd registration and fake (meta) implementation. (On CPU the interpreter runs
    kernels eagerly, so AOT tracing of the triton_op's body needs a GPU; see
    test_compiles_fullgraph_with_inductor_on_gpu.)"""
    args = _op_args()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.lora_kernels.triton_forward, args, test_utils=utils)
    x, weight, _, lora_A, lora_B, s, p, seed = args
    y, u, bits = torch.ops.lora_kernels.triton_forward(*args)
    back = (torch.ones_like(y), x, weight, lora_A, lora_B, s, p, seed, u, bits,
            True, True, True, True)  # fmt: skip
    torch.library.opcheck(torch.ops.lora_kernels.triton_backward, back, test_utils=utils)


def test_dynamo_traces_lora_linear_fullgraph_without_graph_break():
    x, weight, b, lora_A, lora_B, s = make_inputs(17, 40, 24, 7, torch.float32)

    def layer(x):
        return lora_kernels.lora_linear(x, weight, b, lora_A, lora_B, s, 0.1, backend="triton")

    layer(x)  # resolve the backend once, outside the compiled region
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.manual_seed(3)
    y = compiled(x)
    torch.manual_seed(3)
    assert torch.equal(y, layer(x))
    y.sum().backward()
    assert x.grad is not None and lora_A.grad is not None


@pytest.mark.parametrize("name", bt.KERNEL_NAMES)
def test_gpu_autotuner_prunes_to_kernel_configs(name, monkeypatch):
    """The GPU path's autotuner (built here without a GPU, never launched) prunes its
    candidates to exactly `kernel_configs` for what a launcher passes."""
    monkeypatch.delenv("LORA_KERNELS_MAX_CONFIGS", raising=False)  # gpu-check sets it
    target = ((9, 0), bt.SHARED_MEMORY_LIMIT[(9, 0)])
    tuner = launch.tuned(name, target)
    assert tuner.early_config_prune is not None
    sizes = configs.GPU_SIZES
    for dtype, precision in [(torch.bfloat16, "ieee"), (torch.float32, "tf32")]:
        for dropout in (False, True):
            if name in ("fwd", "bwd_dx"):
                block = sizes.r_step_block(64)
            else:
                block = sizes.r_tile_block(64, False)
            kwargs = {"BLOCK_R": block, "INPUT_PRECISION": precision, "HAS_DROPOUT": dropout}
            named = {configs.DTYPE_ARG[name]: torch.empty(0, dtype=dtype)}
            pruned = tuner.early_config_prune(tuner.configs, named, **kwargs)
            expected = bt.kernel_configs(
                name,
                capability=target[0],
                smem_limit=target[1],
                dtype=dtype,
                BLOCK_R=block,
                INPUT_PRECISION=precision,
                HAS_DROPOUT=dropout,
            )
            keys = sorted(configs.config_key(c) for c in pruned)
            assert keys == sorted(configs.config_key(c) for c in expected)


class _StubCompiled:
    def __init__(self, n_spills):
        self.n_spills, self.loaded = None, n_spills

    def _init_handles(self):
        self.n_spills = self.loaded


class _StubKernel:
    """A JIT kernel whose warmup 'compiles' a config into a given spill count (or raises
    OutOfResources), recording what it was asked to compile."""

    def __init__(self, spills_by_block_m):
        self.spills, self.calls = spills_by_block_m, []

    def warmup(self, *, grid, **kwargs):
        self.calls.append(kwargs)
        spills = self.spills[kwargs["BLOCK_M"]]
        if spills is None:
            raise triton.runtime.errors.OutOfResources(1 << 20, 1 << 17, "shared memory")
        return _StubCompiled(spills)


def _cuda_like(monkeypatch):
    """Make launch treat the CPU tensors of a test as real CUDA tensors."""
    monkeypatch.setattr(launch, "_compilable", lambda named_args: True)


def test_spill_free_drops_configs_the_installed_triton_spills(monkeypatch):
    _cuda_like(monkeypatch)
    monkeypatch.setattr(launch, "SPILLED", {})
    estimated = [triton.Config({"BLOCK_M": m}, num_warps=4, num_stages=3) for m in (32, 64, 128)]
    kernel = _StubKernel({32: 3, 64: 0, 128: None})
    named = {"x": torch.empty(1), "M": 7}
    kept = launch.spill_free("shrink", kernel, estimated, named, {"BLOCK_R": 16})
    assert [c.kwargs["BLOCK_M"] for c in kept] == [64]
    assert launch.SPILLED == {("shrink", configs.config_key(estimated[0])): 3}
    # each config compiled once, with the launch's arguments and the config's own
    assert [call["BLOCK_M"] for call in kernel.calls] == [32, 64, 128]
    assert all(call["M"] == 7 and call["BLOCK_R"] == 16 for call in kernel.calls)
    assert all(call["num_warps"] == 4 and call["num_stages"] == 3 for call in kernel.calls)


def test_spill_free_keeps_every_config_when_all_spill_or_none_can_compile(monkeypatch):
    estimated = [triton.Config({"BLOCK_M": m}) for m in (32, 64)]
    kernel = _StubKernel({32: 2, 64: 5})
    named = {"x": torch.empty(1)}
    # CPU tensors (and fake ones under torch.compile): nothing compiled
    assert launch.spill_free("fwd", kernel, estimated, named, {}) == estimated
    assert kernel.calls == []
    _cuda_like(monkeypatch)
    assert launch.spill_free("fwd", kernel, estimated, named, {}) == estimated
    assert len(kernel.calls) == 2
    # a single candidate is the autotuner's choice anyway
    assert launch.spill_free("fwd", kernel, estimated[:1], named, {}) == estimated[:1]
    assert len(kernel.calls) == 2


def test_max_configs_caps_each_launch_at_the_first_spill_free_configs(monkeypatch):
    _cuda_like(monkeypatch)
    monkeypatch.setattr(launch, "SPILLED", {})
    estimated = [triton.Config({"BLOCK_M": m}) for m in (16, 32, 64, 128)]
    kernel = _StubKernel({16: 4, 32: 0, 64: 0, 128: 0})
    kept = launch.spill_free("fwd", kernel, estimated, {"x": torch.empty(1)}, {}, limit=2)
    assert [c.kwargs["BLOCK_M"] for c in kept] == [32, 64]
    assert [call["BLOCK_M"] for call in kernel.calls] == [16, 32, 64]  # stops compiling
    monkeypatch.setattr(launch, "_compilable", lambda named_args: False)
    assert launch.spill_free("fwd", kernel, estimated, {}, {}, limit=3) == estimated[:3]


@pytest.mark.parametrize("value, expected", [("", None), ("1", 1), ("12", 12)])
def test_max_configs_reads_the_environment(value, expected, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_MAX_CONFIGS", value)
    assert launch.max_configs() == expected


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_max_configs_rejects_what_is_not_a_positive_count(value, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_MAX_CONFIGS", value)
    with pytest.raises(ValueError, match=f"LORA_KERNELS_MAX_CONFIGS.*{value!r}"):
        launch.max_configs()


def test_autotune_choices_lists_each_tuned_key(monkeypatch):
    class Tuner:
        cache = {(64, "torch.bfloat16"): triton.Config({"BLOCK_M": 32}, num_warps=8)}

    monkeypatch.setattr(launch, "TUNERS", {("fwd", ((9, 0), 232448)): Tuner()})
    [choice] = launch.autotune_choices()
    assert choice["kernel"] == "fwd" and choice["capability"] == [9, 0]
    assert choice["key"] == ["64", "torch.bfloat16"]
    assert choice["config"] == {"BLOCK_M": 32, "num_warps": 8}


@pytest.mark.parametrize(
    "version, usable", [("3.5.1", False), ("2.3.0", False), ("3.6.0", True), ("3.10.0+git", True)]
)
def test_triton_older_than_the_tested_floor_is_refused_with_the_version(version, usable):
    problem = bt.triton_version_problem(version)
    assert (problem is None) == usable
    if not usable:
        assert "needs Triton 3.6 or newer" in problem and version in problem


def test_compilable_only_for_real_cuda_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert not launch._compilable({"x": torch.empty(2), "M": 2})
    assert not launch._compilable({"x": torch.empty(2, device="meta")})
    with FakeTensorMode():
        fake = torch.empty(2)
    assert not launch._compilable({"x": fake})
    assert not launch._compilable({"M": 2})


# --------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA device (kernels run natively)")


@gpu
@pytest.mark.gpu
def test_compiles_fullgraph_with_inductor_on_gpu():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU()).to(DEVICE)
    x, weight, b, lora_A, lora_B, s = make_inputs(32, 64, 64, 8, torch.bfloat16)

    def layer(x):
        h = lora_kernels.lora_linear(x, weight, b, lora_A, lora_B, s, 0.1, backend="triton")
        return model(h.float())

    layer(x)
    compiled = torch.compile(layer, fullgraph=True)
    torch.manual_seed(0)
    y = compiled(x)
    torch.manual_seed(0)
    y_eager = layer(x)
    assert rel_error(y, y_eager) < 1e-2
    y.sum().backward()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_float32_follows_torch_tf32_setting(allow_tf32, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    x, weight, b, lora_A, lora_B, s = make_inputs(256, 512, 256, 16, torch.float32)
    grad_y = torch.randn(256, 256, device=DEVICE)
    y, _, seed = run_triton(x, weight, b, lora_A, lora_B, s, 0.0, grad_y)
    y_ref, _ = run_reference(x, weight, b, lora_A, lora_B, s, 0.0, seed, grad_y)
    err = rel_error(y, y_ref)
    if allow_tf32:
        assert 1e-6 < err < 5e-3, err  # TF32 rounding shows
    else:
        assert err < 1e-5, err


@gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_64_bit_offsets_beyond_2_to_the_31_elements():
    K, N, R = 4096, 16, 16
    M = 2**31 // K + 129  # M * K > 2^31
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16, generator=g)
    weight = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16, generator=g) * K**-0.5
    lora_A = torch.randn(R, K, device=DEVICE, dtype=torch.bfloat16, generator=g) * K**-0.5
    lora_B = torch.randn(N, R, device=DEVICE, dtype=torch.bfloat16, generator=g)
    s = torch.tensor(0.5, device=DEVICE)
    seed = torch.tensor(11, dtype=torch.int64, device=DEVICE)
    y, u, _ = torch.ops.lora_kernels.triton_forward(x, weight, None, lora_A, lora_B, s, 0.1, seed)
    tail = slice(M - 200, M)  # rows whose offsets pass 2^31
    keep = reference.dropout_keep_mask(11, M, K, 0.1, DEVICE)[tail]
    x_tail = x[tail].double()
    u_ref = (x_tail * keep * reference.dropout_scale(0.1)) @ lora_A.double().t()
    y_ref = x_tail @ weight.double().t() + 0.5 * u_ref @ lora_B.double().t()
    assert rel_error(u[tail], u_ref) < 1e-2
    assert rel_error(y[tail], y_ref) < 1e-2
