"""Inputs, tolerances and comparisons shared by the correctness tests."""

from __future__ import annotations

import pytest
import torch

import lora_kernels
from lora_kernels.reference import lora_linear_reference

# The one tolerance table: ||out - ref|| / ||ref|| against a float64 reference, per dtype
# of the operands. Measured: fp32 ~1e-7, fp16 ~3e-4, bf16 ~2.5e-3 (one rounding of the
# output, plus float32 adapter tiles rounded to x's dtype where a kernel does so).
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 6e-3,
}
FP32_TOL = REL_TOL[torch.float32]
DTYPE_IDS = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Relative error of the whole tensor within the tolerance of `dtype` and out's dtype."""
    tol = max(REL_TOL[dtype], REL_TOL[out.dtype])
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def make_inputs(
    M, K, N, R, dtype, *, lora_dtype=None, bias=True, lead=(), device="cpu", learnable_s=False
):
    """Random x [*lead, M, K] (or [M, K]), W, b, A, B and s; B is random, never zero."""
    g = torch.Generator().manual_seed(1000 * M + 10 * K + N + R)
    lora_dtype = lora_dtype or dtype

    def rand(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt).to(device)

    x = rand(*lead, M, K).requires_grad_()
    weight = rand(N, K, scale=K**-0.5)
    b = rand(N).requires_grad_() if bias else None
    lora_A = rand(R, K, dt=lora_dtype, scale=K**-0.5).requires_grad_()
    lora_B = rand(N, R, dt=lora_dtype, scale=R**-0.5).requires_grad_()
    s = (
        torch.tensor(0.75, dtype=torch.float32, device=device, requires_grad=True)
        if learnable_s
        else 0.75
    )
    return x, weight, b, lora_A, lora_B, s


def differentiable(*tensors):
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


def reference_output_and_grads(x, weight, b, lora_A, lora_B, s, p, seed, grad_y):
    """Output and gradients of the float64 reference for the same (rounded) inputs."""

    def up(t):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().double().requires_grad_(t.requires_grad)

    args64 = [up(t) for t in (x, weight, b, lora_A, lora_B, s)]
    y64 = lora_linear_reference(*args64, dropout_p=p, seed=seed)
    grads64 = torch.autograd.grad(y64, differentiable(*args64), grad_y.double())
    return y64, grads64


def check_against_reference(backend, x, weight, b, lora_A, lora_B, s, p, *, seed_draw=1234):
    """Run lora_linear on `backend` and compare output and every gradient with float64."""
    torch.manual_seed(seed_draw)
    y = lora_kernels.lora_linear(x, weight, b, lora_A, lora_B, s, p, backend=backend)
    # The op draws its seed exactly so; drawing it again reproduces the mask.
    torch.manual_seed(seed_draw)
    seed = torch.randint(2**63 - 1, (), dtype=torch.int64) if p > 0 else 0
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grad_y = grad_y.to(y.dtype).to(y.device)
    inputs = differentiable(x, weight, b, lora_A, lora_B, s)
    grads = torch.autograd.grad(y, inputs, grad_y)
    y64, grads64 = reference_output_and_grads(x, weight, b, lora_A, lora_B, s, p, seed, grad_y)
    dtype = x.dtype
    assert y.dtype == x.dtype
    assert_close(y, y64, dtype, "output")
    named = {"x": x, "weight": weight, "bias": b, "lora_A": lora_A, "lora_B": lora_B, "scaling": s}
    names = [n for n, t in named.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    for name, grad, ref, t in zip(names, grads, grads64, inputs, strict=True):
        assert grad.dtype == t.dtype, f"grad of {name}: dtype {grad.dtype} != {t.dtype}"
        # float32 adapters on a half layer still see half-precision products upstream.
        assert_close(grad, ref, dtype, f"grad of {name}")


def usable_backends(device_type: str) -> list:
    """pytest params: every backend that can run tensors of `device_type` here.

    Unusable ones stay in the list as skips that state the reason, so a run's summary
    shows what was not tested and why.
    """
    from lora_kernels import backends

    params = []
    for name in backends.BACKENDS:
        usable, reason = backends.availability(name)
        if usable and not backends._serves(name, device_type):
            usable, reason = False, f"does not serve {device_type} tensors"
        if name == "triton" and usable and device_type == "cpu":
            reason = "interpreted"
        marks = () if usable else (pytest.mark.skip(reason=f"backend {name!r}: {reason}"),)
        params.append(pytest.param(name, id=name, marks=marks))
    return params


class LoraLinearCalls:
    """Counts the calls of lora_linear made by patched peft modules."""

    def __init__(self, monkeypatch):
        from lora_kernels import peft_patch

        self.calls = 0
        original = peft_patch.lora_linear

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(peft_patch, "lora_linear", counting)
