"""DoRA (`use_dora=True`): peft 0.21's formula on the reference path.

The output and the gradients of x, A, B, m (a bias, a learnable scaling) against a
float64 transcription of peft's `DoraLinearLayer.forward` with the plain op's dropout
mask; `LoRALinear(use_dora=True)` against peft itself; the norm identity of `dora.py`
against the direct norm; the ||W_n||^2 cache against every way the weight can change.
"""

import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPE_IDS, assert_close, make_inputs, usable_backends
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_kernels
from lora_kernels import LoRALinear, dora, memory, ops, reference

F32, F64 = torch.float32, torch.float64


def peft_dora_float64(x, weight, bias, lora_A, lora_B, magnitude, scaling, keep, p):
    """peft 0.21's DoRA forward (lora.Linear.forward, DoraLinearVariant.forward,
    DoraLinearLayer.forward), transcribed step by step, for 2-D float64 operands;
    `keep` None means peft's Identity dropout or eval. The dropout is our op's D: the
    kept elements scaled by 1 / (1 - p) rounded to float32 (`reference.dropout_scale`)."""
    result = F.linear(x, weight, bias)  # base_layer(x)
    if keep is None:
        lora_x = x
        base_result = result - bias if bias is not None else result
    else:
        lora_x = x * keep * reference.dropout_scale(p)  # x = dropout(x)
        base_result = F.linear(lora_x, weight)
    # get_lora_weight: lora_B(lora_A(eye)).T, then get_weight_norm on its detached value.
    eye = torch.eye(lora_A.shape[1], dtype=lora_A.dtype, device=lora_A.device)
    lora_weight = F.linear(F.linear(eye, lora_A), lora_B).T
    weight_norm = torch.linalg.norm(weight + scaling * lora_weight.detach(), dim=1).detach()
    mag_norm_scale = (magnitude / weight_norm).view(1, -1)
    lora_result = F.linear(F.linear(lora_x, lora_A), lora_B)
    result_dora = (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling
    return result + result_dora


def plain_op_mask(M, K, p, manual_seed, device="cpu"):
    """The keep mask [M, K] that the plain op `lora_linear` draws after
    `torch.manual_seed(manual_seed)` for tensors on `device`, read off its output: with
    W = 0, A = B = I and s = 1 its output is D(1) = keep / (1 - p)."""
    eye = torch.eye(K, device=device)
    ones, zeros = torch.ones(M, K, device=device), torch.zeros(K, K, device=device)
    torch.manual_seed(manual_seed)
    return lora_kernels.lora_linear(ones, zeros, None, eye, eye, 1.0, p) != 0


def random_magnitude(weight, lora_A, lora_B, scaling, seed=3):
    """m [N] in the adapters' dtype: the row norms of W + s B A times a factor in
    [0.5, 1.5), so that m/n is far from 1 (a formula that drops m/n fails)."""
    n = reference.dora_weight_norm_reference(weight, lora_A, lora_B, scaling)
    g = torch.Generator().manual_seed(seed)
    factor = (0.5 + torch.rand(n.shape, generator=g, dtype=F64)).to(n.device)
    return (n.double() * factor).to(lora_A.dtype).requires_grad_()


SHAPES = [
    pytest.param((), 13, 21, 11, 5, id="M13-K21-N11-R5"),
    pytest.param((3,), 7, 70, 33, 7, id="x3x7-K70-N33-R7"),
    pytest.param((), 1, 16, 5, 1, id="M1-K16-N5-R1"),
]
DTYPES = [pytest.param(dt, id=DTYPE_IDS[dt]) for dt in (F32, torch.bfloat16, torch.float16)]


# Every backend that serves CPU tensors here; Triton has its own tests below, natively on
# a CUDA device (CUDA tensors) and interpreted elsewhere (CPU tensors).
CPU_BACKENDS = [param for param in usable_backends("cpu") if param.id != "triton"]
# (conftest.py sets TRITON_INTERPRET=1 only where there is no CUDA device.)
TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
TRITON = [param for param in usable_backends(TRITON_DEVICE) if param.id == "triton"]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead, M, K, N, R", SHAPES)
def test_dora_linear_matches_peft_formula_float64(lead, M, K, N, R, dtype, bias, p, backend):
    check_against_peft_formula(lead, M, K, N, R, dtype, bias, p, backend)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_dora_linear_over_several_row_blocks(bias, p, backend):
    """M = 523: the masked products (blocks of 512 rows) and dm's column sums (256) go
    by blocks on the CPU, the last one short; a block skipped or misplaced shows."""
    check_against_peft_formula((), 523, 21, 11, 5, F32, bias, p, backend)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [13, 523])
def test_dora_linear_with_a_bool_mask_as_off_the_cpu(M, dtype, monkeypatch):
    """Off the CPU the mask is applied as bool (`dora_op.mask_dtype`); that path, run
    here on CPU tensors, against the float64 reference."""
    from lora_kernels import dora_op

    monkeypatch.setattr(dora_op, "mask_dtype", lambda like: torch.bool)
    check_against_peft_formula((), M, 21, 11, 5, dtype, True, 0.1, "torch")


# The Triton kernels round float32 adapter tiles to a 16-bit x's dtype, so that their
# plain op meets the tolerances only from about M = 63 (tests/test_backend_triton.py's
# shapes); the interpreter keeps the shapes small.
# The triton backend runs DoRA in its own kernels (g in the forward epilogue, on the B and
# dY tiles in backward, dm's column sums in the dY pass, two accumulators with dropout).
# R = 19 takes dB's own reduction (above the rank the dY pass fuses it at); K = 37 ends
# the keep bits mid-byte. That shape runs in float32 and fp16: in bf16 its scalar ds, a
# sum that cancels, loses more than the table's 6e-3 to the float32 B tiles rounded to
# bf16 on load (kernels.py, Numerics), as the plain triton op's ds does at such sizes.
TRITON_CASES = [
    pytest.param((63, 70, 33, 7), dtype, id=f"M63-K70-N33-R7-{DTYPE_IDS[dtype]}")
    for dtype in (F32, torch.bfloat16, torch.float16)
] + [
    pytest.param((131, 37, 45, 19), dtype, id=f"M131-K37-N45-R19-{DTYPE_IDS[dtype]}")
    for dtype in (F32, torch.float16)
]


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("shape, dtype", TRITON_CASES)
def test_dora_linear_on_triton_matches_peft_formula_float64(shape, dtype, bias, p, backend):
    check_against_peft_formula((), *shape, dtype, bias, p, backend, device=TRITON_DEVICE)


def check_against_peft_formula(
    lead, M, K, N, R, dtype, bias, p, backend, zero_rows=None, device="cpu"
):
    """dora_linear on `backend` with tensors on `device`: output and every gradient
    against float64 peft; `zero_rows` sets those entries of m to 0 (g = 0 there)."""
    # float32 adapters on a 16-bit layer, as LoRALinear (and peft) make them.
    lora_dtype = F32 if dtype != F32 else dtype
    x, weight, b, A, B, _ = make_inputs(
        M, K, N, R, dtype, lora_dtype=lora_dtype, bias=bias, lead=lead, device=device
    )
    s = torch.tensor(0.75, dtype=F32, device=device, requires_grad=True)
    m = random_magnitude(weight, A, B, 0.75)
    if zero_rows is not None:
        with torch.no_grad():
            m[zero_rows] = 0
    torch.manual_seed(11)
    y = lora_kernels.dora_linear(x, weight, b, A, B, m, s, p, backend=backend)
    assert y.dtype == dtype and y.shape == (*lead, M, N)
    Mt = M * (lead[0] if lead else 1)
    keep = plain_op_mask(Mt, K, p, 11, device) if p > 0 else None
    if p > 0:
        assert not keep.all() and keep.any()  # the mask really drops something

    named = {"x": x, "bias": b, "lora_A": A, "lora_B": B, "magnitude": m, "scaling": s}
    named = {k: t for k, t in named.items() if t is not None}
    up = {k: t.detach().double().requires_grad_() for k, t in named.items()}
    y64 = peft_dora_float64(
        up["x"].reshape(Mt, K),
        weight.double(),
        up.get("bias"),
        up["lora_A"],
        up["lora_B"],
        up["magnitude"],
        up["scaling"],
        keep,
        p,
    ).reshape(*lead, M, N)
    assert_close(y, y64, dtype, "output")

    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    grad_y = grad_y.to(dtype).to(device)
    grads = torch.autograd.grad(y, list(named.values()), grad_y)
    grads64 = torch.autograd.grad(y64, list(up.values()), grad_y.double())
    for name, grad, grad64 in zip(named, grads, grads64, strict=True):
        assert grad.dtype == named[name].dtype, f"grad of {name}: dtype {grad.dtype}"
        assert grad64.abs().max() > 0, f"grad of {name} is zero: the check could not fail"
        assert_close(grad, grad64, dtype, f"grad of {name}")
    if zero_rows is not None:
        # Where g = 0, Y holds nothing of Z: dm there must come from Z recomputed.
        grad_m, grad64_m = grads[list(named).index("magnitude")], grads64[-2]
        assert grad64_m[zero_rows].abs().min() > 0
        assert_close(grad_m[zero_rows], grad64_m[zero_rows], dtype, "grad of m where m = 0")


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_magnitude_rows_get_their_gradient(dtype, p, backend):
    check_against_peft_formula((), 13, 21, 11, 5, dtype, True, p, backend, zero_rows=[0, 4, 10])


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_triton_runs_its_own_dora_kernels_not_the_composition(p, backend, monkeypatch):
    """No W_g, B_g or W_c is formed, no [M, K] mask product and no column sum of [M, N]
    tensors is taken outside the kernels: the composition's helpers are never called."""
    from lora_kernels import dora_op

    def composed(*args, **kwargs):
        raise AssertionError("the composition ran on the triton backend")

    for helper in ("_scaled_rows", "_keep_factor_blocks", "_column_dot"):
        monkeypatch.setattr(dora_op, helper, composed)
    check_against_peft_formula((), 63, 70, 33, 7, F32, True, p, backend, device=TRITON_DEVICE)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_zero_magnitude_rows_get_their_gradient_on_triton(p, backend):
    check_against_peft_formula(
        (), 63, 70, 33, 7, F32, True, p, backend, zero_rows=[0, 4, 30], device=TRITON_DEVICE
    )


def test_zero_magnitude_test_can_fail(monkeypatch):
    """Without Z's recomputed columns (here zeros), dm where m = 0 is wrong."""
    from lora_kernels import dora_op

    def zeros(x, weight, lora_A, lora_B, scaling, u, columns):
        return x.new_zeros(x.shape[0], columns.numel(), dtype=F32)

    monkeypatch.setattr(dora_op, "_columns_of_z", zeros)
    with pytest.raises(AssertionError, match="grad of m"):
        check_against_peft_formula((), 13, 21, 11, 5, F32, True, 0.0, "torch", zero_rows=[0])


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_reference_is_peft_formula_in_float64(p):
    """The ground truth itself, in float64 where rounding cannot hide a wrong term."""
    M, K, N, R = 17, 23, 19, 4
    x, weight, b, A, B, _ = make_inputs(M, K, N, R, F64)
    m = random_magnitude(weight, A, B, 0.75)
    keep = reference.dropout_keep_mask(12345, M, K, p) if p > 0 else None
    y = reference.dora_linear_reference(x, weight, b, A, B, m, 0.75, p, seed=12345)
    y_peft = peft_dora_float64(x, weight, b, A, B, m, 0.75, keep, p)
    assert_close(y, y_peft, F64, "output")
    grads = torch.autograd.grad(y.sum(), (x, b, A, B, m))
    grads_peft = torch.autograd.grad(y_peft.sum(), (x, b, A, B, m))
    for name, g, g_peft in zip(("x", "bias", "A", "B", "m"), grads, grads_peft, strict=True):
        assert_close(g, g_peft, F64, f"grad of {name}")


def test_eval_has_no_dropout_and_draws_no_seed():
    x, weight, b, A, B, s = make_inputs(9, 14, 6, 3, F32)
    m = random_magnitude(weight, A, B, s)
    torch.manual_seed(5)
    y_eval = lora_kernels.dora_linear(x, weight, b, A, B, m, s, 0.3, training=False)
    state_after = torch.get_rng_state()
    y_p0 = lora_kernels.dora_linear(x, weight, b, A, B, m, s, 0.0)
    assert torch.equal(state_after, torch.get_rng_state())
    torch.manual_seed(5)
    assert torch.equal(state_after, torch.get_rng_state())  # no draw in eval
    assert torch.equal(y_eval, y_p0)


def test_seed_is_drawn_once_per_call_as_the_plain_op_draws_it():
    x, weight, b, A, B, s = make_inputs(9, 14, 6, 3, F32)
    m = random_magnitude(weight, A, B, s)
    torch.manual_seed(21)
    lora_kernels.lora_linear(x, weight, b, A, B, s, 0.2)
    after_plain = torch.get_rng_state()
    torch.manual_seed(21)
    lora_kernels.dora_linear(x, weight, b, A, B, m, s, 0.2)
    assert torch.equal(after_plain, torch.get_rng_state())


# ---------------------------------------------------------------------------------------
# Against peft itself
# ---------------------------------------------------------------------------------------


class OneLinear(nn.Module):
    def __init__(self, K, N, bias, dtype):
        super().__init__()
        self.lin = nn.Linear(K, N, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.lin(x)


class FixedMaskDropout(nn.Module):
    """peft's lora_dropout with a given keep mask: D(x) = x * keep / (1 - p)."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * self.keep.reshape(x.shape) * reference.dropout_scale(self.p)


def ours_and_peft(K, N, R, dtype, bias, dropout, backend=None):
    """Our DoRA layer and peft's on copies of one random nn.Linear, with equal A, B, m:
    B random and m off the norms (peft inits B = 0 and m = ||W||)."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = OneLinear(K, N, bias, dtype)
    ours = LoRALinear(
        copy.deepcopy(base.lin),
        rank=R,
        alpha=2.0 * R,
        dropout=dropout,
        use_dora=True,
        backend=backend,
    )
    config = peft.LoraConfig(
        r=R, lora_alpha=2.0 * R, lora_dropout=dropout, target_modules=["lin"], use_dora=True
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config).base_model.model.lin
    with torch.no_grad():
        # The inits agree (B = 0, m = the norms of W) before any value is changed; peft
        # takes the norm of a 16-bit layer in its dtype, we in float32.
        assert_close(
            ours.lora_magnitude, theirs.lora_magnitude_vector["default"].weight, dtype, "m init"
        )
        ours.lora_B.normal_(std=0.5)
        ours.lora_magnitude.mul_(0.5 + torch.rand(N))
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_magnitude)
    return ours, theirs


def check_grads_against_peft(ours, theirs, x_ours, x_theirs, dtype) -> None:
    """The gradients of x, A, B and m of our DoRA layer against peft's, after backward
    on both, within `dtype`'s tolerance and in the same dtypes."""
    pairs = {
        "x": (x_ours.grad, x_theirs.grad),
        "lora_A": (ours.lora_A.grad, theirs.lora_A["default"].weight.grad),
        "lora_B": (ours.lora_B.grad, theirs.lora_B["default"].weight.grad),
        "magnitude": (
            ours.lora_magnitude.grad,
            theirs.lora_magnitude_vector["default"].weight.grad,
        ),
    }
    for name, (grad, grad_peft) in pairs.items():
        assert grad.dtype == grad_peft.dtype, f"grad of {name}: {grad.dtype} vs {grad_peft.dtype}"
        assert_close(grad, grad_peft, dtype, f"grad of {name}")


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["p0", "p0.1-peft_given_our_mask"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize(
    "dtype", [pytest.param(dt, id=DTYPE_IDS[dt]) for dt in (F32, torch.bfloat16)]
)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_matches_peft_dora(dtype, bias, dropout, backend):
    K, N, R, lead = 37, 29, 5, (3, 11)
    ours, theirs = ours_and_peft(K, N, R, dtype, bias, dropout, backend)
    if dropout > 0:
        # peft's dropout module replaced by one with the mask our op draws after seed 4.
        theirs.lora_dropout["default"] = FixedMaskDropout(plain_op_mask(33, K, dropout, 4), dropout)
    x = torch.randn(*lead, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(4)
    y = ours(x_ours)
    y_peft = theirs(x_theirs)
    assert y.dtype == y_peft.dtype == dtype
    assert_close(y, y_peft, dtype, "output")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    y.backward(grad_y)
    y_peft.backward(grad_y)
    check_grads_against_peft(ours, theirs, x_ours, x_theirs, dtype)
    # peft freezes the base layer as LoRALinear does: no other gradient to compare.
    assert theirs.base_layer.weight.grad is None and ours.original_linear.weight.grad is None


# ---------------------------------------------------------------------------------------
# The norm without an [N, K] temporary
# ---------------------------------------------------------------------------------------


def norm_operands(N, K, R, dtype, update_scale, cancel_rows=None):
    """W [N, K] in `dtype`, float32 A and B and s with ||s B A|| about `update_scale`
    times ||W|| per row; `cancel_rows` makes those rows W_n = -s B_n A + 1e-3 W_n."""
    g = torch.Generator().manual_seed(N + K + R)
    W = torch.randn(N, K, generator=g, dtype=F64) / K**0.5
    A = torch.randn(R, K, generator=g, dtype=F64) / K**0.5
    B = torch.randn(N, R, generator=g, dtype=F64) * update_scale / R**0.5
    s = 0.75
    if cancel_rows is not None:
        W[cancel_rows] = -(s * B @ A)[cancel_rows] + 1e-3 * W[cancel_rows]
    return W.to(dtype), A.float(), B.float(), s


def row_rel_error(n, weight, A, B, s):
    ref = reference.dora_weight_norm_reference(weight.double(), A.double(), B.double(), s)
    return ((n.double() - ref) / ref).abs()


@pytest.mark.parametrize("update_scale", [1e-3, 1.0], ids=["update_small", "update_comparable"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_row_norm_matches_the_direct_norm(dtype, update_scale):
    W, A, B, s = norm_operands(67, 131, 7, dtype, update_scale)
    n = dora.weight_row_norm(W, A, B, s)
    assert n.dtype == F32 and n.shape == (67,)
    # Per row, relative: the float32 products' rounding only (measured <= 2e-7).
    assert row_rel_error(n, W, A, B, s).max() < 1e-6


def test_weight_row_norm_recomputes_cancelling_rows():
    cancel = slice(0, None, 3)
    W, A, B, s = norm_operands(67, 131, 7, F32, 1.0, cancel)
    n = dora.weight_row_norm(W, A, B, s)
    direct = reference.dora_weight_norm_reference(W, A, B, s)  # float32, the direct form
    error, direct_error = row_rel_error(n, W, A, B, s), row_rel_error(direct, W, A, B, s)
    # No worse than peft's own float32 norm, row by row (1e-3 of ||W|| is left: n^2 is
    # 1e-6 of the terms, where the identity alone would lose every bit).
    assert (error <= 2 * direct_error + 1e-7).all()
    assert error[1::3].max() < 1e-6


def test_weight_row_norm_without_the_guard_would_fail(monkeypatch):
    """The cancellation test can fail: the identity alone is far off on those rows."""
    W, A, B, s = norm_operands(67, 131, 7, F32, 1.0, slice(0, None, 3))
    monkeypatch.setattr(dora, "CANCELLATION_RATIO", 0.0)
    assert row_rel_error(dora.weight_row_norm(W, A, B, s), W, A, B, s).max() > 1e-2


class _LargestOutput(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(
    "dtype", [pytest.param(dt, id=DTYPE_IDS[dt]) for dt in (F32, torch.bfloat16)]
)
def test_weight_row_norm_forms_no_N_by_K_temporary(dtype, monkeypatch):
    N, K, R = 67, 131, 7
    W, A, B, s = norm_operands(N, K, R, dtype, 1.0)
    # Blocks of 1000 elements for the 16-bit W's cast to float32.
    monkeypatch.setattr(dora, "_CHUNK_ELEMENTS", 1000)
    with _LargestOutput() as mode:
        dora.weight_row_norm(W, A, B, s)
    assert 0 < mode.largest <= max(1000 + K, N * R, R * K)
    with _LargestOutput() as mode:
        reference.dora_weight_norm_reference(W, A, B, s)
    assert mode.largest == N * K  # the mode does see the direct form's temporary


# ---------------------------------------------------------------------------------------
# The ||W_n||^2 cache
# ---------------------------------------------------------------------------------------


def dora_layer(K=23, N=17, R=4, dtype=F32):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(K, N, dtype=dtype), rank=R, alpha=8, use_dora=True)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    return layer


def expected_output(layer, x):
    """The layer's output from its current values, through the direct norm."""
    lin = layer.original_linear
    return reference.dora_linear_reference(
        x, lin.weight, lin.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling
    )


def test_cache_computes_the_weight_norm_once(monkeypatch):
    layer = dora_layer()
    x = torch.randn(5, 23)
    calls = []
    real = dora.squared_row_norms
    monkeypatch.setattr(dora, "squared_row_norms", lambda w: calls.append(1) or real(w))
    layer(x)
    layer(x)
    layer(x).sum().backward()
    assert len(calls) == 0  # filled when the magnitude was initialised
    layer._weight_norm_cache.clear()
    layer(x)
    layer(x)
    assert len(calls) == 1


def _write_in_place(layer, new):
    layer.original_linear.weight.copy_(new)


def _assign_data(layer, new):
    layer.original_linear.weight.data = new.clone()


def _new_parameter(layer, new):
    layer.original_linear.weight = nn.Parameter(new.clone(), requires_grad=False)


def _load_state_dict(layer, new):
    layer.original_linear.load_state_dict({"weight": new, "bias": layer.original_linear.bias})


def _through_data_then_clear(layer, new):
    # A write through .data bumps no version counter: clear() is the documented remedy.
    layer.original_linear.weight.data.copy_(new)
    layer._weight_norm_cache.clear()


@pytest.mark.parametrize(
    "change",
    [_write_in_place, _assign_data, _new_parameter, _load_state_dict, _through_data_then_clear],
    ids=["copy_", "data=", "new_parameter", "load_state_dict", "data.copy_+clear"],
)
def test_cache_is_invalidated_when_the_weight_changes(change):
    layer = dora_layer()
    x = torch.randn(5, 23)
    layer(x)
    stale = layer._weight_norm_cache._value.clone()
    new = torch.randn_like(layer.original_linear.weight) * 2
    with torch.no_grad():
        change(layer, new)
    # A stale ||W_n||^2 would be far off: the test would catch its use.
    assert (dora.squared_row_norms(new) - stale).abs().max() > 0.1 * stale.abs().max()
    assert_close(layer(x), expected_output(layer, x), F32, "output after the weight changed")


def test_cache_survives_deepcopy_and_torch_save():
    layer = dora_layer()
    x = torch.randn(5, 23)
    layer(x)
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.original_linear.weight.mul_(3)
    assert_close(clone(x), expected_output(clone, x), F32, "deep copy, weight changed")
    assert_close(layer(x), expected_output(layer, x), F32, "original")
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_close(loaded(x), layer(x), F32, "after torch.save / torch.load")


def test_inference_tensors_are_not_cached():
    with torch.inference_mode():
        layer = dora_layer()
        x = torch.randn(5, 23)
        layer(x)
        layer.original_linear.weight.mul_(2)  # an inference tensor: no version counter
        assert_close(layer(x), expected_output(layer, x), F32, "inference mode")


# ---------------------------------------------------------------------------------------
# LoRALinear(use_dora=True)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("init", ["kaiming", "gaussian", "svd"])
def test_magnitude_starts_at_the_row_norms_and_the_output_at_the_base(init, dtype):
    torch.manual_seed(0)
    base = nn.Linear(23, 17, dtype=dtype)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, rank=4, alpha=8, dropout=0.1, init=init, use_dora=True)
    assert layer.lora_magnitude.dtype == layer.lora_A.dtype and layer.lora_magnitude.requires_grad
    norms = torch.linalg.vector_norm(original.double(), dim=1)
    # init="svd" rounds the residual W - s B A to W's dtype once.
    assert_close(layer.lora_magnitude, norms, dtype if init == "svd" else F32, "magnitude")
    x = torch.randn(6, 23).to(dtype)
    expected = F.linear(x.double(), original.double(), base.bias.double())
    if init != "svd":  # B = 0: dropout has nothing to drop yet
        layer.train()
        assert_close(layer(x), expected, dtype, "output at init, training with dropout")
    layer.eval()
    assert_close(layer(x), expected, dtype, "output at init, eval")


def test_learnable_scaling_trains_and_plain_layers_keep_their_state_dict():
    layer = LoRALinear(nn.Linear(23, 17), rank=4, use_dora=True, learnable_scaling=True)
    layer(torch.randn(5, 23)).sum().backward()
    assert layer.scaling.grad is not None and layer.lora_magnitude.grad.abs().max() > 0
    assert "lora_magnitude" in layer.state_dict()
    plain = LoRALinear(nn.Linear(23, 17), rank=4)
    assert plain.lora_magnitude is None
    assert sorted(plain.state_dict()) == [
        "lora_A",
        "lora_B",
        "original_linear.bias",
        "original_linear.weight",
    ]
    assert "use_dora=True" in repr(layer) and "use_dora" not in repr(plain)


def test_dora_refusals_name_what_is_wrong():
    with pytest.raises(TypeError, match="use_dora must be a bool"):
        LoRALinear(nn.Linear(4, 3), rank=2, use_dora=1)
    x, weight, b, A, B, s = make_inputs(5, 6, 4, 2, F32)
    m = torch.ones(4)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not usable"):
        lora_kernels.dora_linear(x, weight, b, A, B, m, s, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        lora_kernels.dora_linear(x, weight, b, A, B, m, s, backend="gpu")
    with pytest.raises(ValueError, match=r"magnitude must have shape \[4\].*got \[5\]"):
        lora_kernels.dora_linear(x, weight, b, A, B, torch.ones(5), s)
    with pytest.raises(TypeError, match="magnitude must have lora_A's dtype torch.float32"):
        lora_kernels.dora_linear(x, weight, b, A, B, m.double(), s)
    with pytest.raises(ValueError, match="magnitude must be 1-D"):
        lora_kernels.dora_linear(x, weight, b, A, B, m[None], s)
    with pytest.raises(TypeError, match="norm_cache must be a lora_kernels.dora.WeightNormCache"):
        lora_kernels.dora_linear(x, weight, b, A, B, m, s, norm_cache={})


def test_dora_linear_on_meta_gives_shapes():
    x, weight, b, A, B, s = (
        t.to("meta") if isinstance(t, torch.Tensor) else t for t in make_inputs(5, 6, 4, 2, F32)
    )
    y = lora_kernels.dora_linear(x, weight, b, A, B, torch.ones(4, device="meta"), s, 0.1)
    assert y.shape == (5, 4) and y.device.type == "meta"


def test_autocast_casts_every_operand_and_keeps_float32_products():
    x, weight, b, A, B, s = make_inputs(9, 14, 6, 3, F32)
    m = random_magnitude(weight, A, B, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_kernels.dora_linear(x, weight, b, A, B, m, s)
    assert y.dtype == torch.bfloat16
    cast = [t.detach().to(torch.bfloat16).double() for t in (x, weight, b, A, B, m)]
    expected = peft_dora_float64(*cast[:5], cast[5], s, None, 0.0)
    assert_close(y, expected, torch.bfloat16, "output under autocast")
    assert ops.autocast_operands(x, weight)[1] is weight  # no autocast: unchanged


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_activation_checkpointing_recomputes_the_same_mask(backend):
    layer = dora_layer()
    layer.dropout = 0.3
    layer.backend = backend
    x = torch.randn(6, 23, requires_grad=True)
    torch.manual_seed(8)
    layer(x).square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude)]
    for t in (x, layer.lora_A, layer.lora_B, layer.lora_magnitude):
        t.grad = None
    torch.manual_seed(8)
    y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    y.square().sum().backward()
    for name, grad, t in zip(
        ("x", "A", "B", "m"),
        grads,
        (x, layer.lora_A, layer.lora_B, layer.lora_magnitude),
        strict=True,
    ):
        assert torch.equal(t.grad, grad), f"grad of {name} differs under checkpointing"


def test_apply_lora_use_dora_and_the_model_helpers_keep_the_magnitude(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 5))
    lora_kernels.apply_lora(model, rank=3, alpha=6, use_dora=True)
    layers = dict(lora_kernels.lora_layers(model))
    assert len(layers) == 2 and all(layer.use_dora for layer in layers.values())
    for name, layer in layers.items():
        expected = layer.original_linear.weight.double().norm(dim=1)  # B = 0: the norms of W
        assert torch.allclose(layer.lora_magnitude.double(), expected, rtol=1e-6), name
    lora_kernels.mark_only_lora_as_trainable(model)
    assert all(layer.lora_magnitude.requires_grad for layer in layers.values())
    state = lora_kernels.lora_state_dict(model)
    assert {"0.lora_magnitude", "2.lora_magnitude"} <= set(state)
    trained = {k: v + 0.25 for k, v in state.items()}
    lora_kernels.load_lora_state_dict(model, trained)
    assert torch.equal(layers["0"].lora_magnitude.detach(), trained["0.lora_magnitude"])
    # save_adapter writes it in peft's format (tests/test_dora_interop.py).
    lora_kernels.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------------------------------
# What backward keeps, torch.compile, double backward
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS + TRITON)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize(
    "dtype", [pytest.param(dt, id=DTYPE_IDS[dt]) for dt in (F32, torch.bfloat16)]
)
def test_backward_keeps_x_u_the_bits_and_one_M_by_N_tensor(dtype, p, backend):
    """x, U (none from "cpu" without dropout), with dropout the 1-bit mask, n [N] and
    one [M, N] tensor in x's dtype: Y itself without dropout, P = (X * keep) W^T with
    it. No [N, K] tensor, no float [M, K] tensor but x."""
    M, K, N, R = 61, 48, 40, 4
    layer = LoRALinear(
        nn.Linear(K, N, dtype=dtype), rank=R, dropout=p, use_dora=True, backend=backend
    )
    x = torch.randn(M, K, dtype=dtype, requires_grad=True)
    y, saved = memory.saved_activations(lambda: layer(x), exclude=list(layer.parameters()))
    shapes = {(tuple(t.shape), t.dtype) for t in saved.tensors}
    assert all(t.shape != (N, K) for t in saved.tensors), saved.describe()
    by_shape = {}
    for t in saved.tensors:
        key = (t.untyped_storage().data_ptr(), tuple(t.shape), t.dtype)
        by_shape.setdefault((tuple(t.shape), t.dtype), set()).add(key)
    assert len(by_shape.get(((M, N), dtype), ())) == 1, saved.describe()
    float_MK = [t for t in saved.tensors if t.shape == (M, K) and t.is_floating_point()]
    assert all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in float_MK)
    MN = next(t for t in saved.tensors if t.shape == (M, N))
    if p == 0:
        assert MN.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
    acc_bytes = 4
    expected = x.nbytes + M * N * x.element_size() + N * acc_bytes  # and n [N]
    if not (backend == "cpu" and p == 0):
        expected += M * R * acc_bytes  # U
    if p > 0:
        expected += M * ((K + 7) // 8)  # the keep bits
        assert ((M, (K + 7) // 8), torch.uint8) in shapes
    # The seed and the scaling (0-dim) are all else.
    assert expected <= saved.bytes <= expected + 64, saved.describe()


@pytest.mark.parametrize("backend", CPU_BACKENDS + TRITON)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_compile_fullgraph(p, backend):
    layer = dora_layer()
    layer.dropout, layer.backend = p, backend
    layer.scaling = nn.Parameter(torch.tensor(layer.scaling))
    x = torch.randn(9, 23, requires_grad=True)
    params = [x, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling]

    def step(x):
        return layer(x).square().sum()

    torch.manual_seed(0)
    eager = torch.autograd.grad(step(x), params)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    got = torch.autograd.grad(compiled(x), params)
    for a, e in zip(got, eager, strict=True):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_double_backward_raises_and_first_order_grads_come_back(backend):
    x, weight, b, A, B, s = make_inputs(9, 14, 6, 3, F32)
    m = random_magnitude(weight, A, B, s)
    y = lora_kernels.dora_linear(x, weight, b, A, B, m, s, backend=backend)
    grads = torch.autograd.grad(y.square().sum(), (x, m), create_graph=True)
    assert all(g is not None and g.shape == t.shape for g, t in zip(grads, (x, m), strict=True))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grads[1].sum(), m)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.bool], ids=str
)
@pytest.mark.parametrize("K", [1, 7, 8, 21, 70])
def test_table_unpack_of_the_keep_bits_is_the_reference_unpack(K, dtype):
    from lora_kernels import dora_op

    keep = reference.dropout_keep_mask(2**40 + 7, 13, K, 0.5)
    bits = reference.pack_keep_mask(keep)
    factors = dora_op.keep_factors(bits, K, dtype)
    assert factors.dtype == dtype and factors.shape == (13, K)
    assert torch.equal(factors, reference.unpack_keep_mask(bits, K).to(dtype))
    assert torch.equal(factors != 0, keep) and 0 < int(keep.sum()) < keep.numel()


@pytest.mark.parametrize("backend", [pytest.param("torch", id="torch"), *TRITON])
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_ops_pass_opcheck(p, backend):
    """The ops' fakes, schemas and autograd registration, on the composition ("torch")
    and on the triton backend's own DoRA kernels."""
    from lora_kernels import dora_op

    device = "cpu" if backend == "torch" else TRITON_DEVICE
    x, weight, b, A, B, _ = make_inputs(9, 14, 6, 3, F32, device=device)
    m = random_magnitude(weight, A, B, 0.75)
    n = reference.dora_weight_norm_reference(weight, A, B, 0.75)
    s = torch.tensor(0.75, device=device, requires_grad=True)
    seed = torch.tensor(12345, dtype=torch.int64, device=device)
    args = (x, weight, b, A, B, m, n, s, p, seed, backend)
    torch.library.opcheck(dora_op.dora_forward, args)
    with torch.no_grad():
        y, u, bits, dropped = dora_op.dora_forward(*args)
    kept = y if p == 0 else dropped
    plain = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    grad_args = (torch.randn_like(y), *plain[:10], u, bits, kept, backend)
    torch.library.opcheck(dora_op.dora_backward, (*grad_args, True, True, True, True, True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_mode_ad_and_a_trainable_weight_take_the_composition(backend):
    x, weight, b, A, B, s = make_inputs(9, 14, 6, 3, F32)
    m = random_magnitude(weight, A, B, s)
    args = (weight, b, A, B, m, s)
    x0, tangent = x.detach(), torch.randn(x.shape)
    y, jvp = torch.func.jvp(
        lambda x: lora_kernels.dora_linear(x, *args, backend=backend), (x0,), (tangent,)
    )
    y_ref, jvp_ref = torch.func.jvp(
        lambda x: reference.dora_linear_reference(x, *args), (x0,), (tangent,)
    )
    assert_close(y, y_ref, F32, "output under jvp")
    assert_close(jvp, jvp_ref, F32, "jvp")
    trainable = weight.clone().requires_grad_()
    y = lora_kernels.dora_linear(x, trainable, b, A, B, m, s, backend=backend)
    (grad,) = torch.autograd.grad(y.square().sum(), trainable)
    y_ref = reference.dora_linear_reference(x, trainable, b, A, B, m, s)
    (grad_ref,) = torch.autograd.grad(y_ref.square().sum(), trainable)
    assert grad.abs().max() > 0
    assert_close(grad, grad_ref, F32, "grad of a trainable weight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("M", [3, 511, 700, 1024])
def test_column_dot_of_row_blocks_is_the_sum_of_products(M, dtype):
    """dm's sums over rows (of dY * Y, and of dY for the bias term), in blocks of 256
    rows on the CPU (a short last block at 700), against float64."""
    from lora_kernels import dora_op

    g = torch.Generator().manual_seed(M)
    a = torch.randn(M, 37, generator=g).to(dtype)
    b = torch.randn(M, 37, generator=g).to(dtype) + 0.5
    expected = (a.double() * b.double()).sum(0)
    out = dora_op._column_dot(a, b, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (37,)
    assert_close(out, expected, torch.float32, f"column dot, M={M}")
    dot, column_sum = dora_op._column_dot(a, b, torch.float32, with_sum=True)
    assert torch.equal(dot, out) and column_sum.dtype == torch.float32
    assert_close(column_sum, a.double().sum(0), torch.float32, f"column sum, M={M}")


@pytest.mark.parametrize("backend", CPU_BACKENDS + TRITON)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize(
    "trained",
    [("magnitude",), ("x", "magnitude"), ("lora_A", "lora_B"), ("x",), ("bias", "magnitude")],
    ids="+".join,
)
def test_any_subset_of_inputs_can_train(trained, p, backend):
    """Frozen adapters with a trained magnitude (or any other subset) run backward, and
    each gradient asked for is the one the all-trainable call gives (up to rounding: a
    backend may sum dX in another order when it forms no adapter gradient)."""
    x, weight, b, A, B, _ = make_inputs(13, 21, 11, 5, F32)
    m = random_magnitude(weight, A, B, 0.75)
    named = {"x": x, "bias": b, "lora_A": A, "lora_B": B, "magnitude": m}

    def grads(names):
        leaves = {k: t.detach().requires_grad_(k in names) for k, t in named.items()}
        torch.manual_seed(4)
        y = lora_kernels.dora_linear(
            leaves["x"], weight, leaves["bias"], leaves["lora_A"], leaves["lora_B"],
            leaves["magnitude"], 0.75, p, backend=backend,
        )  # fmt: skip
        wanted = [leaves[k] for k in names]
        return dict(zip(names, torch.autograd.grad(y, wanted, torch.ones_like(y)), strict=True))

    every = grads(tuple(named))
    for name, grad in grads(trained).items():
        assert_close(grad, every[name].double(), F32, f"grad of {name}")
