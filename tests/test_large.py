"""Offsets past 2**31 and 2**32 elements do not wrap (`make test-long`).

x is [M, K] with M*K just above 2**32 elements (K = 1000, so the element offsets 2**31
and 2**32 fall inside rows), all zero but for a few rows: the first, the rows holding
element 2**31 and 2**32 and their neighbours, and the last. A kernel that keeps an
element offset in 32 bits, signed or not, reads another row (or faults) for the rows
past those points. Checked: the whole output (every zero row must give exactly the
bias), the written rows against the float64 reference with the dropout mask of their
row index, and dA, dB and db (dY is zero but on the written rows, so the exact sums are
over those rows). dX is not computed: it would write M*K elements.

Memory: on CPU the zeros come from calloc, whose untouched pages all map the kernel's
one zero page, so x costs address space but almost no RAM (8.6 GB of bf16, 17.2 GB of
fp32). The check runs in a child process whose address space is capped at x plus
8 GiB, so a backend that makes a copy of x fails with an allocation error instead of
pushing a shared machine into the OOM killer.

Per backend: "torch" in float32 without dropout (its bf16 path upcasts x, its dropout
draws the mask as int64 tensors of M*K/4 elements: neither fits); "cpu", "cuda" and
"triton" on CUDA in bfloat16 with p = 0.1, and "cpu" also with p = 0 (its backward
then recomputes U in a pass of its own over x and dY); "triton" on CPU is skipped
(interpreted, a grid over 4.3e9 elements would take hours).

`test_offset_check_on_a_small_input` runs the same check on a small x in `make test`,
so the harness itself is exercised on every backend.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import DTYPE_IDS, assert_close
from hypothesis_profiles import backend_device_params

import lora_kernels
from lora_kernels.ops import SEED_BOUND
from lora_kernels.reference import (
    dropout_keep_mask,
    dropout_scale,
    dropout_threshold,
    philox4x32_10,
)

N, R = 8, 4
LARGE_K = 1000
LARGE_M = math.ceil(2**32 / LARGE_K) + 8
HEADROOM = 8 * 2**30

_NUMPY_STORAGE = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.float16}


def zeros(M: int, K: int, dtype: torch.dtype, device_type: str) -> torch.Tensor:
    """[M, K] zeros; on CPU from calloc, so untouched pages take no RAM."""
    if device_type != "cpu":
        return torch.zeros(M, K, dtype=dtype, device=device_type)
    storage = np.zeros(M * K, dtype=_NUMPY_STORAGE[dtype])
    return torch.from_numpy(storage).view(dtype).view(M, K)


def keep_rows(seed: int, rows: list[int], K: int, p: float) -> torch.Tensor:
    """The reference keep mask of the given rows only: [len(rows), K] (bool)."""
    groups = (K + 3) // 4
    q = torch.tensor(rows, dtype=torch.int64)[:, None] * groups + torch.arange(groups)
    zero = torch.zeros_like(q)
    key = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    words = philox4x32_10((q & 0xFFFFFFFF, q >> 32, zero, zero), key)
    words = torch.stack(words, dim=-1).reshape(len(rows), groups * 4)[:, :K]
    return words >= dropout_threshold(p)


def check_offsets(backend, device_type, dtype, p, M, K, rows):
    """lora_linear on an x of zeros but `rows`; see the module docstring."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device_type)

    x = zeros(M, K, dtype, device_type)
    x_rows = rand(len(rows), K)
    x[rows] = x_rows
    weight = rand(N, K, scale=K**-0.5)
    bias = rand(N).requires_grad_()
    lora_A = rand(R, K, scale=K**-0.5, dt=torch.float32).requires_grad_()
    lora_B = rand(N, R, dt=torch.float32).requires_grad_()
    s = 0.75

    torch.manual_seed(5)
    y = lora_kernels.lora_linear(x, weight, bias, lora_A, lora_B, s, p, backend=backend)
    torch.manual_seed(5)
    seed = int(torch.randint(SEED_BOUND, (), dtype=torch.int64)) if p > 0 else 0
    assert y.shape == (M, N)
    wrong = (y != bias.detach()).any(dim=1)
    wrong[rows] = False
    assert not wrong.any(), f"zero rows not giving the bias: {wrong.nonzero()[:8].flatten()}"

    x64, W64, b64 = x_rows.double().cpu(), weight.double().cpu(), bias.detach().double().cpu()
    A64, B64 = lora_A.detach().double().cpu(), lora_B.detach().double().cpu()
    dropped = x64 * keep_rows(seed, rows, K, p) * dropout_scale(p) if p > 0 else x64
    u64 = dropped @ A64.t()
    y64 = x64 @ W64.t() + b64 + s * u64 @ B64.t()
    assert_close(y[rows].cpu(), y64, dtype, f"output rows {rows}")

    grad_y = torch.zeros(M, N, dtype=dtype, device=device_type)
    grad_y[rows] = rand(len(rows), N)
    grads = torch.autograd.grad(y, (bias, lora_A, lora_B), grad_y)
    grad_b, grad_A, grad_B = (grad.cpu() for grad in grads)
    dy64 = grad_y[rows].double().cpu()
    assert_close(grad_b, dy64.sum(0), dtype, "grad of bias")
    assert_close(grad_A, s * (dy64 @ B64).t() @ dropped, dtype, "grad of lora_A")
    assert_close(grad_B, s * dy64.t() @ u64, dtype, "grad of lora_B")


def _plans(backend: str, device_type: str) -> list[tuple[torch.dtype, float]]:
    """(dtype, p) of each large check for a backend (see the module docstring)."""
    if backend == "torch":
        return [(torch.float32, 0.0)]
    if backend == "cpu":
        return [(torch.bfloat16, 0.1), (torch.bfloat16, 0.0)]
    return [(torch.bfloat16, 0.1)]


@pytest.mark.parametrize("device_type, backend", backend_device_params())
@pytest.mark.parametrize("p", [0.0, 0.25], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_offset_check_on_a_small_input(device_type, backend, dtype, p):
    M, K = 70, 30
    check_offsets(backend, device_type, dtype, p, M, K, [0, 1, 33, M - 2, M - 1])


def test_row_mask_matches_the_full_mask():
    rows = [0, 5, 6, 41]
    full = dropout_keep_mask(123456789012345, 42, 13, 0.3)
    assert torch.equal(keep_rows(123456789012345, rows, 13, 0.3), full[rows])


CHILD = """
import resource, sys
import torch
sys.path.insert(0, {tests!r})
if {cap} > 0:
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
import test_large
test_large.check_offsets({backend!r}, {device!r}, torch.{dtype}, {p}, {M}, {K}, {rows})
print("ok")
"""


@pytest.mark.slow
@pytest.mark.parametrize("device_type, backend", backend_device_params())
def test_offsets_past_2_to_the_31_and_32_elements_do_not_wrap(device_type, backend):
    if backend == "triton" and device_type == "cpu":
        pytest.skip("triton on CPU is interpreted: a grid over 4.3e9 elements takes hours")
    for dtype, p in _plans(backend, device_type):
        _check_large(device_type, backend, dtype, p)


def _check_large(device_type: str, backend: str, dtype: torch.dtype, p: float) -> None:
    x_bytes = LARGE_M * LARGE_K * torch.finfo(dtype).bits // 8
    if device_type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if free < x_bytes + 4 * 2**30:
            pytest.skip(f"needs {x_bytes / 2**30:.1f} GiB + 4 GiB of GPU memory")
    else:
        import psutil

        if psutil.virtual_memory().available < 4 * 2**30:
            pytest.skip("needs 4 GiB of free RAM (x itself lives in the zero page)")
    K, M = LARGE_K, LARGE_M
    row31, row32 = 2**31 // K, 2**32 // K  # the rows holding elements 2**31 and 2**32
    rows = [0, 1, row31 - 1, row31, row31 + 1, row32 - 1, row32, row32 + 1, M - 1]
    cap = x_bytes + HEADROOM if device_type == "cpu" else 0
    code = CHILD.format(
        tests=str(Path(__file__).parent),
        cap=cap,
        backend=backend,
        device=device_type,
        dtype=str(dtype).removeprefix("torch."),
        p=p,
        M=M,
        K=K,
        rows=rows,
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (
        f"{dtype}, p = {p}: {result.stderr[-3000:]}"
    )
