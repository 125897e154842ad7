"""The "triton" backend: fused Triton kernels for the LoRA linear op and its backward.

Two `torch.library` ops, `lora_kernels::triton_forward` and `triton_backward`, with the
contract's fakes and autograd formula (`lora_kernels.contract`), and the backend
contract functions `availability`, `serves` and `load` (docs/backends.md). The package:

    kernels.py      the @triton.jit kernels, and the plan of what each one computes
    configs.py      the autotune policy: candidate configs, register and shared-memory
                    estimates, the sizes the launchers choose (read by
                    benchmarks/compile_report.py)
    launch.py       one launch_<kernel>() per kernel; forward and backward as their calls
    interpreter.py  what differs under TRITON_INTERPRET=1 (CPU tensors, slow, small
                    tiles), which is read once, when this package is imported
    dequant.py      the bitsandbytes 4-bit dequantize (lora_kernels.dequantize_4bit):
                    kernel, launcher and the op lora_kernels::triton_dequantize_4bit

Forward is two launches (shrink U = D(X) A^T with the keep mask's bits, then
Y = X W^T + b + s U B^T); backward is one pass over dY (G = dY B with dB, db and ds
partials), dX, dA (and dB above R = 16), each reduction summed from fp32 partials in a
fixed order. Configs come from `configs.kernel_configs` (autotuned on the problem
sizes, pruned to what compiles without spills, checked for sm_80 and sm_90 by
benchmarks/compile_report.py); under TRITON_INTERPRET=1 the same kernels run on CPU
tensors with one small config.

DoRA has passes of its own here (`load_dora`: `dora_forward`, `dora_backward`), the same
launches with DoRA's flags set (kernels.py); `lora_kernels.dora_op` calls them and keeps
the math.
"""

from __future__ import annotations

import functools
import re

import torch
import triton
from torch.library import triton_op

from ..contract import backward_fake, forward_fake, keep_bits_shape, register_lora_autograd
from . import interpreter, launch
from .configs import KERNEL_NAMES, SHARED_MEMORY_LIMIT, TARGETS, kernel_configs

__all__ = ["KERNEL_NAMES", "SHARED_MEMORY_LIMIT", "TARGETS", "availability", "kernel_configs"]
__all__ += ["dropout_keep_mask", "load", "serves", "triton_backward", "triton_forward"]
__all__ += ["dora_backward", "dora_forward", "load_dora"]


@triton_op("lora_kernels::triton_forward", mutates_args=())
def triton_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, K = x.shape[0], x.shape[-1]  # forward_into checks that x is 2-D
    y = torch.empty((M, weight.shape[0]), dtype=x.dtype, device=x.device)
    u = torch.empty((M, lora_A.shape[0]), dtype=torch.float32, device=x.device)
    # With dropout the shrink writes the mask's bits here; else an empty [0].
    keep_bits = torch.empty(keep_bits_shape(M, K, dropout_p), dtype=torch.uint8, device=x.device)
    with interpreter.one_at_a_time():
        launch.forward_into(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, y, u, keep_bits
        )
    return y, u, keep_bits


triton_forward.register_fake(forward_fake)


@triton_op("lora_kernels::triton_backward", mutates_args=())
def triton_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
    u: torch.Tensor,
    keep_bits: torch.Tensor,
    need_grad_x: bool,
    need_grad_lora: bool,
    need_grad_scaling: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out, grads = _grad_buffers(
        x, lora_A, lora_B, scaling, need_grad_x, need_grad_lora, need_grad_scaling, need_grad_bias
    )
    with interpreter.one_at_a_time():
        launch.backward_into(
            grad_y, x, weight, lora_A, lora_B, scaling, dropout_p, seed, u, keep_bits, grads
        )
    return out


def _buffer(flag: bool, shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape if flag else (0,), dtype=dtype, device=device)


def _grad_buffers(x, lora_A, lora_B, scaling, need_x, need_lora, need_scaling, need_bias):
    """(the backward op's outputs, empty [0] where not asked for; launch.Grads of them)."""
    M, K = x.shape
    N, R = lora_B.shape
    out = (
        _buffer(need_x, (M, K), x.dtype, x.device),
        _buffer(need_lora, (R, K), lora_A.dtype, x.device),
        _buffer(need_lora, (N, R), lora_B.dtype, x.device),
        _buffer(need_scaling, (), scaling.dtype, x.device),
        _buffer(need_bias, (N,), x.dtype, x.device),
    )
    flags = (need_x, need_lora, need_lora, need_scaling, need_bias)
    return out, launch.Grads(*(t if flag else None for t, flag in zip(out, flags, strict=True)))


triton_backward.register_fake(backward_fake)


# ---------------------------------------------------------------------------------------
# DoRA's fused passes (called by lora_kernels.dora_op, which holds the math)
# ---------------------------------------------------------------------------------------


def dora_forward(x, weight, bias, lora_A, lora_B, row_scale, base_scale, scaling, dropout_p, seed):
    """(Y, U, keep_bits, P) of DoRA in the forward kernels: g = row_scale [N] fp32 in the
    GEMM's epilogue without dropout; with it base_scale c [N] fp32 and P = (X * keep)
    W^T [M, N] (x's dtype) from the same pass over W (`kernels.lora_fwd_kernel`)."""
    M, K = x.shape[0], x.shape[-1]
    N = weight.shape[0]
    has_dropout = dropout_p > 0.0
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    u = torch.empty((M, lora_A.shape[0]), dtype=torch.float32, device=x.device)
    keep_bits = torch.empty(keep_bits_shape(M, K, dropout_p), dtype=torch.uint8, device=x.device)
    dropped = _buffer(has_dropout, (M, N), x.dtype, x.device)
    dora = launch.DoraForward(
        row_scale, base_scale if has_dropout else None, None, dropped if has_dropout else None
    )
    with interpreter.one_at_a_time():
        launch.forward_into(
            x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, y, u, keep_bits, dora
        )
    return y, u, keep_bits, dropped


def dora_backward(
    grad_y, x, weight, lora_A, lora_B, row_scale, base_scale, scaling, dropout_p, seed, u,
    keep_bits, kept, need_grad_x, need_grad_lora, need_grad_scaling, need_grad_bias,
    need_kept_sum, need_dy_sum,
):  # fmt: skip
    """(grad_x, grad_A, grad of diag(g) B, grad_scaling, grad_bias, sum over rows of
    dY * kept, sum over rows of dY) of DoRA in the backward kernels, the column sums
    [N] fp32 (for dm) where asked for, each output empty [0] where not
    (`launch.DoraBackward`)."""
    out, grads = _grad_buffers(
        x, lora_A, lora_B, scaling, need_grad_x, need_grad_lora, need_grad_scaling, need_grad_bias
    )
    N = weight.shape[0]
    kept_sum = _buffer(need_kept_sum, (N,), torch.float32, x.device)
    dy_sum = _buffer(need_dy_sum, (N,), torch.float32, x.device)
    dora = launch.DoraBackward(
        row_scale,
        base_scale if dropout_p > 0.0 else None,
        kept,
        kept_sum if need_kept_sum else None,
        dy_sum if need_dy_sum else None,
    )
    with interpreter.one_at_a_time():
        launch.backward_into(
            grad_y, x, weight, lora_A, lora_B, scaling, dropout_p, seed, u, keep_bits, grads, dora
        )
    return (*out, kept_sum, dy_sum)


register_lora_autograd(triton_forward, triton_backward)


def dropout_keep_mask(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The keep mask [M, K] (bool) exactly as the kernels make it.

    `seed` is a 0-dim int64 tensor on the device; for tests against
    `reference.dropout_keep_mask`.
    """
    return launch.keep_mask_bytes(seed, M, K, p) == 1


# ---------------------------------------------------------------------------------------
# The backend contract (docs/backends.md)
# ---------------------------------------------------------------------------------------


# The oldest Triton the kernels are tested on (make test-compat); setup.py says the same.
MIN_TRITON = (3, 6)


def triton_version_problem(version: str) -> str | None:
    """Why Triton `version` cannot serve the backend (older than `MIN_TRITON`), or None."""
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if release < MIN_TRITON:
        oldest = ".".join(map(str, MIN_TRITON))
        return f"needs Triton {oldest} or newer (the oldest tested), got Triton {version}"
    return None


@functools.cache
def _availability() -> tuple[bool, str]:
    too_old = triton_version_problem(triton.__version__)
    if too_old:
        return False, too_old
    if interpreter.ACTIVE:
        return True, f"Triton {triton.__version__} interpreter (TRITON_INTERPRET=1), CPU tensors"
    if not torch.cuda.is_available():
        return False, (
            "no CUDA device (to run the Triton kernels on CPU tensors, set "
            "TRITON_INTERPRET=1 before importing lora_kernels)"
        )
    if torch.version.cuda is None:
        return False, "the Triton kernels are built and tuned for NVIDIA GPUs only"
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        return False, f"needs an NVIDIA GPU of compute capability 8.0 or newer, got {capability}"
    return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name()}"


def availability(name: str) -> tuple[bool, str]:
    """(usable on this machine, why not). Cheap after the first call; never raises."""
    try:
        usable, reason = _availability()
    except Exception as error:  # a broken CUDA setup makes the backend unusable, not fatal
        return False, f"{type(error).__name__}: {error}"
    late = interpreter.late_switch()
    if not usable and late:
        return False, f"{reason}; {late}"
    return usable, reason


def serves(name: str, device_type: str) -> bool:
    """CUDA tensors; CPU tensors too under TRITON_INTERPRET=1 (as set at import)."""
    return device_type == "cuda" or (interpreter.ACTIVE and device_type == "cpu")


def load(name: str):
    """(forward_op, backward_op) of the triton backend."""
    return torch.ops.lora_kernels.triton_forward, torch.ops.lora_kernels.triton_backward


def load_dora(name: str):
    """(dora_forward, dora_backward): the backend's own DoRA passes (docs/backends.md)."""
    return dora_forward, dora_backward
