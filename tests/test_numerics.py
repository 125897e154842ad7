"""Numerics on every backend: non-finite inputs, fp16 range, no_grad, eval mode."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPE_IDS, assert_close
from hypothesis_profiles import backend_device_params
from torch import nn

import lora_kernels
from lora_kernels import LoRALinear
from lora_kernels.memory import saved_activations
from lora_kernels.ops import SEED_BOUND
from lora_kernels.reference import lora_linear_reference

BACKENDS = backend_device_params()
FP16_MAX = torch.finfo(torch.float16).max


def rand(g, *shape, scale=1.0, dtype=torch.float32, device="cpu"):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def rng_states(device_type):
    """The generator states a forward could draw from: CPU's, and the device's."""
    states = [torch.get_rng_state()]
    if device_type == "cuda":
        states.append(torch.cuda.get_rng_state())
    return states


# Non-finite values of x: (row, column, value). Row 9 holds +inf and -inf (inf - inf).
M, K, N, R = 12, 37, 19, 5
NON_FINITE = [(2, 5, float("nan")), (5, 0, float("inf")), (7, K - 1, float("-inf"))]
NON_FINITE += [(9, 3, float("inf")), (9, 4, float("-inf"))]
BAD_ROWS = sorted({m for m, _, _ in NON_FINITE})
BAD_COLUMNS = sorted({k for _, k, _ in NON_FINITE})


@pytest.mark.parametrize("device_type, backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_nan_and_inf_in_x_propagate_to_the_positions_nn_linear_gives(
    device_type, backend, p, dtype
):
    g = torch.Generator().manual_seed(0)
    x = rand(g, M, K, dtype=dtype, device=device_type)
    for m, k, value in NON_FINITE:
        x[m, k] = value
    x.requires_grad_()
    weight = rand(g, N, K, scale=K**-0.5, dtype=dtype, device=device_type)
    bias = rand(g, N, dtype=dtype, device=device_type).requires_grad_()
    lora_A = rand(g, R, K, scale=K**-0.5, device=device_type).requires_grad_()
    lora_B = rand(g, N, R, scale=R**-0.5, device=device_type).requires_grad_()

    torch.manual_seed(1)
    y = lora_kernels.lora_linear(x, weight, bias, lora_A, lora_B, 1.5, p, backend=backend)
    torch.manual_seed(1)
    seed = torch.randint(SEED_BOUND, (), dtype=torch.int64) if p > 0 else 0
    y_linear = nn.functional.linear(x, weight, bias)
    # Where, not what: inf + inf from the branch may give NaN where nn.Linear has inf.
    assert torch.equal(torch.isfinite(y), torch.isfinite(y_linear))
    assert (~torch.isfinite(y[BAD_ROWS])).all(), "a non-finite input row must not be masked"

    args64 = [t.detach().double() for t in (x, weight, bias, lora_A, lora_B)]
    y64 = lora_linear_reference(*args64, 1.5, p, seed=seed)
    good_rows = [m for m in range(M) if m not in BAD_ROWS]
    assert_close(y[good_rows], y64[good_rows], dtype, "finite rows of the output")

    grad_y = rand(g, M, N, dtype=dtype, device=device_type)
    grads = dict(
        zip(
            "x bias A B".split(),
            torch.autograd.grad(y, (x, bias, lora_A, lora_B), grad_y),
            strict=True,
        )
    )
    # dX = dY W + s D(G A) and db = sum dY never read x: finite, as nn.Linear's dX.
    assert torch.isfinite(grads["x"]).all() and torch.isfinite(grads["bias"]).all()
    x64, w64, b64, a64, bl64 = (t.detach().double().requires_grad_() for t in args64)
    y64 = lora_linear_reference(x64, w64, b64, a64, bl64, 1.5, p, seed=seed)
    grads64 = torch.autograd.grad(y64, (x64, a64, bl64), grad_y.double())
    assert_close(grads["x"], grads64[0], dtype, "grad of x")
    if p == 0:
        # dA = s G^T X: the columns of x holding a non-finite value, as nn.Linear's dW;
        # dB = s dY^T U: every element (each sums over the non-finite rows of U).
        # With dropout the reference's NaN * 0 = NaN would also decide dropped elements.
        expected = torch.ones(R, K, dtype=torch.bool)
        expected[:, BAD_COLUMNS] = False
        assert torch.equal(torch.isfinite(grads["A"]).cpu(), expected)
        assert not torch.isfinite(grads["B"]).any()
        good_columns = [k for k in range(K) if k not in BAD_COLUMNS]
        assert_close(grads["A"][:, good_columns], grads64[1][:, good_columns], dtype, "grad A")


# Inputs near the fp16 limit whose exact result fits fp16 comfortably; the LoRA branch
# has an intermediate beyond it: s * U (case "sU") or U itself (case "U").
OVERFLOW_CASES = [
    pytest.param(8.0, 4.0, id="sU-above-fp16-max"),  # A ~ 1/8: |U| < 65504 < |s U|
    pytest.param(2.0, 1.0, id="U-above-fp16-max"),  # A ~ 1/2: |U| > 65504
]


@pytest.mark.parametrize("device_type, backend", BACKENDS)
@pytest.mark.parametrize("lora_dtype", [torch.float32, torch.float16], ids=["A:fp32", "A:fp16"])
@pytest.mark.parametrize("a_divisor, s", OVERFLOW_CASES)
def test_large_fp16_inputs_do_not_overflow_where_the_fp32_reference_does_not(
    device_type, backend, lora_dtype, a_divisor, s
):
    M, K, N, R = 16, 64, 24, 4
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(M, K, generator=g) * 2 - 1).mul(3e4).half().to(device_type).requires_grad_()
    weight = rand(g, N, K, scale=1e-3, dtype=torch.float16, device=device_type)
    bias = rand(g, N, dtype=torch.float16, device=device_type).requires_grad_()
    lora_A = rand(g, R, K, scale=1 / a_divisor, dtype=lora_dtype, device=device_type)
    lora_B = rand(g, N, R, scale=1e-3, dtype=lora_dtype, device=device_type)
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    operands = (x, weight, bias, lora_A, lora_B)

    # The premise: the fp32 reference stays in fp16's range, an intermediate does not.
    f32 = [t.detach().float() for t in operands]
    u = f32[0] @ f32[3].t()
    beyond = (s * u if a_divisor == 8.0 else u).abs().max()
    assert beyond > FP16_MAX and (u.abs().max() <= FP16_MAX) == (a_divisor == 8.0)
    y32 = lora_linear_reference(*f32, s)
    assert torch.isfinite(y32).all() and y32.abs().max() < FP16_MAX / 8

    y = lora_kernels.lora_linear(*operands, s, backend=backend)
    bad = int((~torch.isfinite(y)).sum())
    assert bad == 0, f"{bad} fp16 outputs overflowed where the fp32 reference did not"
    f64 = [t.detach().double().requires_grad_(t.requires_grad) for t in operands]
    y64 = lora_linear_reference(*f64, s)
    assert_close(y, y64, torch.float16, "output")

    grad_y = rand(g, M, N, dtype=torch.float16, device=device_type)
    wrt = (x, bias, lora_A, lora_B)
    grads = torch.autograd.grad(y, wrt, grad_y)
    grads64 = torch.autograd.grad(y64, [f64[i] for i in (0, 2, 3, 4)], grad_y.double())
    checked = []
    for name, t, grad, grad64 in zip(("x", "bias", "A", "B"), wrt, grads, grads64, strict=True):
        # A gradient whose exact value is beyond its dtype's range overflows legitimately.
        if grad64.abs().max() < torch.finfo(t.dtype).max / 8:
            bad = int((~torch.isfinite(grad)).sum())
            assert bad == 0, f"{bad} elements of the grad of {name} overflowed"
            assert_close(grad, grad64, torch.float16, f"grad of {name}")
            checked.append(name)
    assert {"x", "bias", "A"} <= set(checked), checked


@pytest.mark.parametrize("device_type, backend", BACKENDS)
@pytest.mark.parametrize(
    "context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"]
)
def test_no_grad_and_inference_mode_save_nothing_for_backward(device_type, backend, context):
    g = torch.Generator().manual_seed(4)
    x = rand(g, 8, 16, device=device_type).requires_grad_()
    layer = LoRALinear(nn.Linear(16, 12, device=device_type), rank=4, dropout=0.2, backend=backend)
    lora_A, lora_B = layer.lora_A, layer.lora_B
    with context():
        y, saved = saved_activations(
            lambda: lora_kernels.lora_linear(
                x, layer.original_linear.weight, None, lora_A, lora_B, 1.0, 0.1, backend=backend
            )
        )
        y_layer, saved_layer = saved_activations(lambda: layer(x))
    assert saved.tensors == [] and saved_layer.tensors == []
    assert not y.requires_grad and not y_layer.requires_grad
    if context is torch.inference_mode:
        assert y.is_inference() and y_layer.is_inference()


@pytest.mark.parametrize("device_type, backend", BACKENDS)
def test_eval_mode_applies_no_dropout_and_draws_no_seed(device_type, backend):
    g = torch.Generator().manual_seed(5)
    x, weight, bias = (rand(g, *s, device=device_type) for s in ((9, 24), (10, 24), (10,)))
    lora_A, lora_B = rand(g, 4, 24, device=device_type), rand(g, 10, 4, device=device_type)
    args = (x, weight, bias, lora_A, lora_B, 2.0)

    before = rng_states(device_type)
    y_eval = lora_kernels.lora_linear(*args, 0.5, training=False, backend=backend)
    y_no_dropout = lora_kernels.lora_linear(*args, 0.0, training=True, backend=backend)
    for state, now in zip(before, rng_states(device_type), strict=True):
        assert torch.equal(state, now), "eval mode or p = 0 drew from a generator"
    assert torch.equal(y_eval, y_no_dropout)
    y_train = lora_kernels.lora_linear(*args, 0.5, training=True, backend=backend)
    assert not torch.equal(y_train, y_eval), "dropout must act in training mode"

    torch.manual_seed(0)
    base = nn.Linear(24, 10, device=device_type)
    layer = LoRALinear(base, rank=4, dropout=0.5, backend=backend)
    nn.init.normal_(layer.lora_B)
    layer.eval()
    before = rng_states(device_type)
    y_layer = layer(x)
    for state, now in zip(before, rng_states(device_type), strict=True):
        assert torch.equal(state, now), "LoRALinear in eval mode drew from a generator"
    layer.dropout = 0.0
    assert torch.equal(layer(x), y_layer)
