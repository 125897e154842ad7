"""The fused op over a 4-bit base weight (QLoRA): `qlora_linear`.

    Y = X W^T + b + s * (D(X) A^T) B^T,   W = dequantize(packed weight, quant state)

`lora_linear` sends a bitsandbytes `Params4bit` weight here. Each call dequantizes W
into a workspace (`workspace`) and runs the backend's plain forward op on it
unchanged; backward dequantizes again and runs the plain backward op. The dense W is
never saved: what backward keeps is what the plain op keeps (x, U, the seed, the
packed mask) plus the packed weight and its quant-state tensors, which are
parameters and buffers of the layer, not activations. That is why this is an op of
its own (`lora_kernels::qlora_forward` / `qlora_backward`, torch.library custom ops
with one autograd registration): the plain op's autograd would save its weight
argument, the workspace, which the next layer overwrites.

Numerics, as bitsandbytes' `Linear4bit` on its default (PyTorch) path, so that
outputs and gradients agree with peft's 4-bit layer: forward dequantizes straight to
the compute dtype (x's dtype; the float32 products rounded once, bitsandbytes'
`gemm_4bit`), backward dequantizes to `quant_state.dtype` and casts that to the compute
dtype (`MatMul4Bit.backward`: two roundings when the dtypes differ).

The workspace rule: one flat buffer per (thread, device, dtype, CUDA stream), grown to
the largest layer seen and reused by every 4-bit layer. A buffer is written and read
within one op call, so layers on one thread and one stream never see each other's W;
another thread or stream gets its own buffer. Its memory is held until the thread
ends or `release_workspaces()` is called.
"""

from __future__ import annotations

import math
import threading

import torch

from . import backends, contract, quant4bit, reference
from .validation import check_backend, check_flag

_workspaces = threading.local()


def _stream_key(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return None


def workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous tensor of `shape` from this thread's buffer for (device, dtype,
    current CUDA stream), grown when too small; its contents are whatever was there."""
    pool = getattr(_workspaces, "pool", None)
    if pool is None:
        pool = _workspaces.pool = {}
    key = (device, dtype, _stream_key(device))
    numel = math.prod(shape)
    buffer = pool.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def release_workspaces() -> None:
    """Drop this thread's dequantize workspaces (their memory goes back to the allocator)."""
    _workspaces.pool = {}


def workspace_bytes() -> int:
    """Bytes held by this thread's dequantize workspaces."""
    pool = getattr(_workspaces, "pool", {})
    return sum(b.numel() * b.element_size() for b in pool.values())


def _packed(
    packed,
    absmax,
    code,
    absmax_code,
    absmax2,
    offset,
    blocksize,
    blocksize2,
    N,
    K,
    weight_dtype,
    quant_type,
) -> quant4bit.Packed4bit:
    return quant4bit.Packed4bit(
        packed=packed,
        absmax=absmax,
        code=code,
        blocksize=blocksize,
        shape=(N, K),
        dtype=weight_dtype,
        quant_type=quant_type,
        absmax_code=absmax_code,
        absmax2=absmax2,
        offset=offset,
        blocksize2=blocksize2,
    )


def _forward_weight(w: quant4bit.Packed4bit, dtype: torch.dtype, dequant: str) -> torch.Tensor:
    """W for the forward: the products rounded once to the compute dtype."""
    out = workspace(w.shape, dtype, w.packed.device)
    return quant4bit.dequantize_into(w, out, dequant)


def _backward_weight(w: quant4bit.Packed4bit, dtype: torch.dtype, dequant: str) -> torch.Tensor:
    """W for dX: rounded to quant_state.dtype, then to the compute dtype."""
    out = workspace(w.shape, dtype, w.packed.device)
    if w.dtype == dtype:
        return quant4bit.dequantize_into(w, out, dequant)
    stored = workspace(w.shape, w.dtype, w.packed.device)
    return out.copy_(quant4bit.dequantize_into(w, stored, dequant))


# ---------------------------------------------------------------------------------------
# The two ops and their autograd
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("lora_kernels::qlora_forward", mutates_args=())
def qlora_forward(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax_code: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    seed: torch.Tensor,
    blocksize: int,
    blocksize2: int,
    N: int,
    weight_dtype: torch.dtype,
    quant_type: str,
    dropout_p: float,
    backend: str,
    dequant: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain op's forward (y, u, keep_bits) over W dequantized into the workspace."""
    w = _packed(
        packed,
        absmax,
        code,
        absmax_code,
        absmax2,
        offset,
        blocksize,
        blocksize2,
        N,
        x.shape[1],
        weight_dtype,
        quant_type,
    )
    forward_op, _ = backends.backend_ops(backend)
    weight = _forward_weight(w, x.dtype, dequant)
    return forward_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@qlora_forward.register_fake
def _(
    x,
    packed,
    absmax,
    code,
    absmax_code,
    absmax2,
    offset,
    bias,
    lora_A,
    lora_B,
    scaling,
    seed,
    blocksize,
    blocksize2,
    N,
    weight_dtype,
    quant_type,
    dropout_p,
    backend,
    dequant,
):
    # The backend's own fake shapes the outputs (the "cpu" backend's u is empty at p=0).
    forward_op, _ = backends.backend_ops(backend)
    weight = x.new_empty(N, x.shape[1])
    return forward_op(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)


@torch.library.custom_op("lora_kernels::qlora_backward", mutates_args=())
def qlora_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax_code: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: torch.Tensor,
    seed: torch.Tensor,
    u: torch.Tensor,
    keep_bits: torch.Tensor,
    blocksize: int,
    blocksize2: int,
    N: int,
    weight_dtype: torch.dtype,
    quant_type: str,
    dropout_p: float,
    backend: str,
    dequant: str,
    need_grad_x: bool,
    need_grad_lora: bool,
    need_grad_scaling: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain op's backward; W is dequantized again only when dX is asked for (no
    other gradient reads it)."""
    w = _packed(
        packed,
        absmax,
        code,
        absmax_code,
        absmax2,
        offset,
        blocksize,
        blocksize2,
        N,
        x.shape[1],
        weight_dtype,
        quant_type,
    )
    _, backward_op = backends.backend_ops(backend)
    if need_grad_x:
        weight = _backward_weight(w, x.dtype, dequant)
    else:
        weight = workspace(w.shape, x.dtype, x.device)
    return backward_op(
        grad_y,
        x,
        weight,
        lora_A,
        lora_B,
        scaling,
        dropout_p,
        seed,
        u,
        keep_bits,
        need_grad_x,
        need_grad_lora,
        need_grad_scaling,
        need_grad_bias,
    )


@qlora_backward.register_fake
def _(
    grad_y,
    x,
    packed,
    absmax,
    code,
    absmax_code,
    absmax2,
    offset,
    lora_A,
    lora_B,
    scaling,
    seed,
    u,
    keep_bits,
    blocksize,
    blocksize2,
    N,
    weight_dtype,
    quant_type,
    dropout_p,
    backend,
    dequant,
    nx,
    nl,
    ns,
    nb,
):
    weight = x.new_empty(N, x.shape[1])
    return contract.backward_fake(
        grad_y, x, weight, lora_A, lora_B, scaling, dropout_p, seed, u, keep_bits, nx, nl, ns, nb
    )


# Positions of qlora_forward's inputs.
_X, _BIAS, _LORA_A, _LORA_B, _SCALING = 0, 7, 8, 9, 10
_N_INPUTS = 20
_STATE = slice(1, 7)  # packed, absmax, code, absmax_code, absmax2, offset


def _setup_context(ctx, inputs, output):
    x, lora_A, lora_B, scaling, seed = (inputs[i] for i in (_X, _LORA_A, _LORA_B, _SCALING, 11))
    _, u, keep_bits = output
    state = inputs[_STATE]
    # Optional quant-state tensors (None without double quantization) are kept aside:
    # save_for_backward takes tensors only.
    ctx.present = tuple(t is not None for t in state)
    ctx.save_for_backward(
        x, lora_A, lora_B, scaling, seed, u, keep_bits, *(t for t in state if t is not None)
    )
    ctx.meta = inputs[12:]
    ctx.mark_non_differentiable(u, keep_bits)


def _backward(ctx, grad_y, grad_u, grad_keep_bits):
    x, lora_A, lora_B, scaling, seed, u, keep_bits, *present = ctx.saved_tensors
    it = iter(present)
    state = [next(it) if p else None for p in ctx.present]
    need = ctx.needs_input_grad
    differentiable = [t for t in (grad_y, x, lora_A, lora_B, scaling) if t.requires_grad]
    second_order = torch.is_grad_enabled() and bool(differentiable)
    with torch.no_grad():
        grad_x, grad_A, grad_B, grad_scaling, grad_bias = qlora_backward(
            grad_y,
            x,
            *state,
            lora_A,
            lora_B,
            scaling,
            seed,
            u,
            keep_bits,
            *ctx.meta,
            need[_X],
            need[_LORA_A] or need[_LORA_B],
            need[_SCALING],
            need[_BIAS],
        )
    grads = [None] * _N_INPUTS
    grads[_X] = grad_x if need[_X] else None
    grads[_BIAS] = grad_bias if need[_BIAS] else None
    grads[_LORA_A] = grad_A if need[_LORA_A] else None
    grads[_LORA_B] = grad_B if need[_LORA_B] else None
    grads[_SCALING] = grad_scaling if need[_SCALING] else None
    grads = tuple(grads)
    return contract._first_order_only(grads, differentiable) if second_order else grads


torch.library.register_autograd(
    "lora_kernels::qlora_forward", _backward, setup_context=_setup_context
)


# ---------------------------------------------------------------------------------------
# The public entry point (called by lora_linear)
# ---------------------------------------------------------------------------------------


def _dequant_backend(name: str, device_type: str) -> str:
    """The dequantize kernel that goes with op backend `name`: the same backend where it
    has one, else the automatic choice for the device."""
    if name in quant4bit.DEQUANTIZE_BACKENDS:
        return quant4bit._choose_backend(device_type, name)
    return quant4bit._choose_backend(device_type, None)


def check_4bit_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend):
    """The checks of a call over a 4-bit `weight` (`qlora_linear`, `qdora_op`), after
    autocast's casts: (the packed weight, the dropout p in effect)."""
    from . import ops

    w = quant4bit.read_4bit_weight(weight)
    qs = weight.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError(
            "weight is in bitsandbytes' AVX512-BF16 inference layout (quant_state."
            "packing_format_for_cpu, set by an eval-mode Linear4bit forward without grad); "
            "LoRALinear converts it back, or call bitsandbytes.functional."
            "_convert_weight_packed_for_cpu_inverse"
        )
    if len(w.shape) != 2:
        raise ValueError(f"weight's quant_state.shape must be 2-D [N, K], got {list(w.shape)}")
    if weight.requires_grad:
        raise ValueError(
            "weight is a 4-bit Params4bit that requires grad; a 4-bit base weight is "
            "frozen (set weight.requires_grad_(False)), only the adapter trains"
        )
    N, K = w.shape
    # The checks of the plain op, with a zero-stride stand-in for the dense weight.
    if isinstance(x, torch.Tensor) and x.dtype in ops._FLOAT_DTYPES:
        standin = torch.empty((), dtype=x.dtype, device=w.packed.device).expand(N, K)
    else:
        standin = torch.empty((), dtype=torch.float32, device=w.packed.device).expand(N, K)
    p = ops._check_arguments(x, standin, bias, lora_A, lora_B, scaling, dropout_p)
    if x.dtype == torch.float64:
        raise TypeError("x must be float32, float16 or bfloat16 with a 4-bit weight, got float64")
    check_flag("training", training)
    check_backend(backend)
    return w, (p if training else 0.0)


def qlora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend):
    """`lora_linear` for a bitsandbytes 4-bit `weight` (a `Params4bit` with its
    quant_state): same arguments and result; x's dtype is the compute dtype."""
    from . import ops

    if isinstance(x, torch.Tensor) and x.dtype in ops._FLOAT_DTYPES:
        x, bias, lora_A, lora_B = ops.autocast_operands(x, bias, lora_A, lora_B)
    w, p = check_4bit_call(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend)
    N, K = w.shape
    x2d = x.reshape(math.prod(x.shape[:-1]), K)
    acc = contract.accumulation_dtype(x.dtype)
    seed = ops.call_seed(p, x.device)
    name = backends.resolve_backend(x.device.type, backend)
    dequant = _dequant_backend(name, x.device.type)

    if ops.composition_needed():
        # torch.func and forward-mode AD: the reference's composition over a dense copy of
        # W (these paths have no fused op, hence no workspace rule to keep).
        dense = torch.empty((N, K), dtype=x.dtype, device=x.device)
        quant4bit.dequantize_into(w, dense, dequant)
        y = reference.lora_linear_reference(x2d, dense, bias, lora_A, lora_B, scaling, p, seed=seed)
        return y.reshape(*x.shape[:-1], N)

    if isinstance(scaling, torch.Tensor):
        scaling_t = scaling.reshape(()).to(acc)
    else:
        scaling_t = torch.full((), float(scaling), dtype=acc, device=x.device)
    with ops._autocast_disabled(x.device.type):
        y, _, _ = qlora_forward(
            x2d,
            w.packed,
            w.absmax,
            w.code,
            w.absmax_code,
            w.absmax2,
            w.offset,
            bias,
            lora_A,
            lora_B,
            scaling_t,
            seed,
            w.blocksize,
            w.blocksize2,
            N,
            w.dtype,
            w.quant_type,
            p,
            name,
            dequant,
        )
    return y.reshape(*x.shape[:-1], N)


def linear4bit_forward(
    base, x, lora_A, lora_B, scaling, dropout_p, training, backend, magnitude=None, norm_cache=None
):
    """A LoRA adapter over a bitsandbytes `Linear4bit` `base`, as its forward computes:
    x and the bias cast to the compute dtype (`base.compute_dtype`, else x's), the
    result cast back to x's dtype. With a DoRA `magnitude` [N] (and its `norm_cache`),
    `dora_linear` in place of `lora_linear` (QDoRA). `LoRALinear` and patched peft 4-bit
    layers call it."""
    from . import ops

    weight = plain_4bit_weight(base)
    dtype = base.compute_dtype if base.compute_dtype is not None else x.dtype
    bias = base.bias.to(dtype) if base.bias is not None else None
    if magnitude is None:
        y = ops.lora_linear(
            x.to(dtype), weight, bias, lora_A, lora_B, scaling, dropout_p, training, backend
        )
    else:
        y = ops.dora_linear(
            x.to(dtype), weight, bias, lora_A, lora_B, magnitude, scaling, dropout_p, training,
            backend, norm_cache,
        )  # fmt: skip
    return y.to(x.dtype)


def plain_4bit_weight(base):
    """The Params4bit of `Linear4bit` `base` in bitsandbytes' standard layout. An
    eval-mode forward of the base layer without grad on an AVX512-BF16 CPU repacks it
    for bitsandbytes' own kernel; that is undone here, as bitsandbytes does before
    saving a state dict."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    fix_4bit_weight_quant_state_from_module(base)
    weight = base.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(
            weight.data, weight.quant_state
        )
    return weight
