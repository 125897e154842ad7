"""What backward keeps: x itself, U (the CPU backend without dropout: none), the seed
and the 1-bit packed keep mask; never D(x), a byte or bool mask, or an upcast copy."""

import pytest
import torch
from helpers import usable_backends

import lora_kernels
from lora_kernels.memory import saved_activations

M, K, N, R = 64, 512, 96, 16


@pytest.mark.parametrize("backend", usable_backends("cpu"))
@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize(
    "dtype,lora_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16-fp32-adapters"],
)
def test_saved_bytes_are_x_plus_u(backend, p, dtype, lora_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(N, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    lora_A = torch.randn(R, K, generator=g).to(lora_dtype).requires_grad_()
    lora_B = torch.randn(N, R, generator=g).to(lora_dtype).requires_grad_()
    params = (weight, bias, lora_A, lora_B)

    y, saved = saved_activations(
        lambda: lora_kernels.lora_linear(x, weight, bias, lora_A, lora_B, 2.0, p, backend=backend),
        exclude=params,
    )
    # U is kept in float32; without dropout the CPU backend keeps none (its backward
    # recomputes U in the pass over x that dA needs anyway).
    u_bytes = 0 if backend == "cpu" and p == 0 else M * R * 4
    # With dropout, the keep mask packed one bit per element: uint8 [M, ceil(K / 8)].
    bits_shape = (M, (K + 7) // 8)
    bits_bytes = M * ((K + 7) // 8) if p > 0 else 0
    # Two 0-dim scalars ride along: the seed (int64) and the scaling s (float32).
    scalar_bytes = 8 + 4
    x_bytes = x.numel() * x.element_size()
    assert saved.bytes <= x_bytes + u_bytes + bits_bytes + scalar_bytes, saved.describe()
    # x is kept as the caller's tensor, not a copy.
    assert any(t.data_ptr() == x.data_ptr() for t in saved.tensors), saved.describe()
    # The mask only in its packed form: no bool or byte mask of M x K elements.
    masks = [t for t in saved.tensors if t.dtype in (torch.bool, torch.uint8) and t.numel() > 0]
    assert [tuple(t.shape) for t in masks] == ([bits_shape] if p > 0 else []), saved.describe()
    # And the ratio of docs/design.md: 1.03 x bytes(x) for float32, R=16, K=512 (plus
    # 1/32 for the packed mask).
    if dtype == torch.float32:
        assert (saved.bytes - bits_bytes) / x_bytes < 1.04
    y.sum().backward()  # what was saved is enough for backward


def test_no_grad_and_inference_mode_save_nothing():
    x = torch.randn(8, 16, requires_grad=True)
    lora_A = torch.randn(2, 16, requires_grad=True)
    lora_B = torch.randn(4, 2, requires_grad=True)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            _, saved = saved_activations(
                lambda: lora_kernels.lora_linear(
                    x, torch.randn(4, 16), None, lora_A, lora_B, 1.0, 0.1, backend="torch"
                )
            )
        assert saved.tensors == []
