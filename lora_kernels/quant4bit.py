"""4-bit base weights (bitsandbytes NF4 / FP4): the format, its decode, `dequantize_4bit`.

The format, as bitsandbytes' `quantize_4bit` writes it and its kernels read it:

- The dense weight of `quant_state.shape` ([N, K] for a `Linear4bit`) is flattened
  row-major to n elements and cut into blocks of `blocksize` consecutive elements, so a
  block spans two rows when K is not a multiple of the blocksize; the last block may be
  short.
- Element i is a 4-bit code c_i, two codes per byte: element 2j in the high nibble of
  byte j, element 2j + 1 in its low nibble (the last low nibble is padding when n is
  odd). The bytes sit in a tensor of `quant_storage` dtype (uint8, or a float dtype
  whose bytes are only reinterpreted: the FSDP setting), [ceil(n / 2 / itemsize), 1].
- W_i = CODE[c_i] * absmax[i // blocksize]: one float32 product, rounded once to the
  output dtype (`quant_state.dtype`).
- With double quantization (`quant_state.nested`) absmax is itself 8-bit codes a_b:
  absmax[b] = code2[a_b] * absmax2[b // blocksize2] + offset in float32, the product
  rounded before the sum (never a fused multiply-add: bitsandbytes runs them as two
  kernels); blocksize2 is 256.

`dequantize_4bit_reference` below is that decode in PyTorch, the executable contract
every kernel is tested against; `dequantize_4bit` is the public entry point, which
checks its input and picks the kernel. bitsandbytes is never imported here unless a
caller hands in a quant state: the format is read from the tensors themselves.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass

import torch

QUANT_TYPES = ("nf4", "fp4")
# The blocksizes bitsandbytes' dequantize_4bit accepts.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Backends with a dequantize kernel.
DEQUANTIZE_BACKENDS = ("cuda", "triton", "cpu", "torch")
# The automatic choice per device type, best first; the reference where none is usable.
_PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}

# NF4: the 16 quantiles of N(0, 1) normalised to [-1, 1] (QLoRA, arXiv 2305.14314), as
# float32 literals exactly as bitsandbytes' `get_4bit_type("nf4")` lists them.
_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, divided by 12 in
# float32 as `get_4bit_type("fp4")` does. Code 8 is the sign bit alone, -0.0: what
# bitsandbytes' CUDA and C++ CPU kernels decode (its table spells it `-0`, an int, so
# its pure-PyTorch fallback, which it takes on the CPU for odd K, writes +0.0 there).
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
_FP4 += tuple(-v for v in _FP4)
_FP4_SCALE = 12.0


def _make_code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32, device=device)
    return torch.tensor(_FP4, dtype=torch.float32, device=device) / _FP4_SCALE


_cached_code_table = functools.cache(_make_code_table)


def code_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16 values a 4-bit code stands for (float32 [16], on `device`)."""
    if torch.compiler.is_compiling():  # a constant of the graph; dynamo skips caches
        return _make_code_table(quant_type, device)
    return _cached_code_table(quant_type, device)


@dataclass(frozen=True)
class Packed4bit:
    """The operands of one dequantize, read from a weight and its quant state and
    checked: what every kernel takes.

    packed [ceil(n/2)] uint8; absmax [blocks] float32, or with double quantization
    uint8 codes with absmax_code [256] float32, absmax2 [ceil(blocks/blocksize2)]
    float32 and offset [] float32; code [16] float32; all on one device.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    blocksize: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    quant_type: str
    absmax_code: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    blocksize2: int = 256

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


# ---------------------------------------------------------------------------------------
# The reference decode
# ---------------------------------------------------------------------------------------


def _scale_blocks_(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> None:
    """values[i] *= scales[i // blocksize], in place (values 1-D float32): the whole
    blocks as rows of [blocks, blocksize], one scale per row, then the short last one."""
    full = values.numel() - values.numel() % blocksize
    values[:full].view(-1, blocksize).mul_(scales[: full // blocksize, None])
    values[full:].mul_(scales[full // blocksize :])


def nested_absmax_reference(
    absmax_q: torch.Tensor,
    absmax_code: torch.Tensor,
    absmax2: torch.Tensor,
    offset: torch.Tensor,
    blocksize2: int,
) -> torch.Tensor:
    """absmax[b] = code2[a_b] * absmax2[b // blocksize2] + offset, float32 [blocks].

    The product is rounded to float32 before the offset is added, as bitsandbytes does.
    """
    absmax = absmax_code.index_select(0, absmax_q.int())
    _scale_blocks_(absmax, absmax2, blocksize2)
    return absmax.add_(offset)


def dequantize_4bit_reference(w: Packed4bit, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight of shape `w.shape` in `w.dtype` (written into `out` if given):
    W_i = CODE[c_i] * absmax[i // blocksize] over the flattened weight, c_{2j} the high
    nibble of byte j."""
    n, blocksize, device = w.numel, w.blocksize, w.packed.device
    # Row b of the pair table: the values of byte b's two codes, (CODE[b >> 4], CODE[b & 15]).
    byte = torch.arange(256, device=device)
    pairs = torch.stack((w.code[byte >> 4], w.code[byte & 0xF]), dim=1)
    # The float32 values are made in place: in `out` itself when it is float32 and holds
    # every code of the bytes (n even, 8-byte aligned), else in a buffer cast into `out`.
    direct = out is not None and out.dtype == torch.float32 and n % 2 == 0
    direct = direct and out.storage_offset() % 2 == 0
    if direct:
        values = out.view(-1)
    else:
        values = torch.empty(2 * w.packed.numel(), dtype=torch.float32, device=device)
    # A row of two float32 moved as one 8-byte word: a 1-D gather, some 4x faster on the
    # CPU than a gather of rows (the bytes are copied, never read as an integer).
    words = pairs.view(torch.int64).view(-1)
    torch.index_select(words, 0, w.packed.int(), out=values.view(torch.int64))
    if w.nested:
        absmax = nested_absmax_reference(w.absmax, w.absmax_code, w.absmax2, w.offset, w.blocksize2)
    else:
        absmax = w.absmax
    _scale_blocks_(values[:n], absmax, blocksize)
    dense = values[:n].view(w.shape)
    if out is None:
        return dense.to(w.dtype)
    if not direct:
        out.copy_(dense)
    return out


# ---------------------------------------------------------------------------------------
# Reading and checking a 4-bit weight
# ---------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(str(d) for d in t.shape)}]"


def _quant_state_class():
    """bitsandbytes' QuantState, imported only now that a quant state has appeared."""
    try:
        from bitsandbytes.functional import QuantState
    except ImportError as error:
        raise ImportError(
            "dequantize_4bit reads bitsandbytes 4-bit weights, but bitsandbytes cannot be "
            f"imported ({error}); install it with `pip install bitsandbytes`"
        ) from error
    return QuantState


def is_4bit_weight(t) -> bool:
    """Whether t is a bitsandbytes `Params4bit` (False without importing bitsandbytes:
    if it was never imported, no such weight exists)."""
    modules = sys.modules.get("bitsandbytes.nn")
    return modules is not None and isinstance(t, modules.Params4bit)


def _check_operand(name: str, t, numel: int, device: torch.device, dtype=torch.float32):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel:
        raise ValueError(f"{name} must hold {numel} elements, got shape {_shape(t)}")
    if t.device != device:
        raise ValueError(f"{name} must be on the weight's device {device}, got {t.device}")
    return t.detach().reshape(-1)


def read_4bit_weight(weight, quant_state=None) -> Packed4bit:
    """The checked operands of `weight` (a `Params4bit`, or the packed tensor) and its
    quant state (`quant_state`, else `weight.quant_state`)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            "weight must be a bitsandbytes Params4bit or its packed torch.Tensor, "
            f"got {type(weight).__name__}"
        )
    if quant_state is None:
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            raise ValueError(
                f"weight ({type(weight).__name__} of {weight.dtype}, shape {_shape(weight)}) "
                "has no quant_state: pass a quantized bitsandbytes Params4bit (one moved to "
                "its device, which quantizes it) or the packed tensor with quant_state="
            )
    QuantState = _quant_state_class()
    if not isinstance(quant_state, QuantState):
        raise TypeError(
            f"quant_state must be a bitsandbytes QuantState, got {type(quant_state).__name__}"
        )
    qs = quant_state
    if qs.quant_type not in QUANT_TYPES:
        raise ValueError(
            f"quant_state.quant_type must be one of {QUANT_TYPES}, got {qs.quant_type!r}"
        )
    if qs.blocksize not in BLOCKSIZES:
        raise ValueError(f"quant_state.blocksize must be one of {BLOCKSIZES}, got {qs.blocksize!r}")
    if qs.dtype not in OUTPUT_DTYPES:
        raise ValueError(
            "quant_state.dtype (the dense weight's dtype) must be float32, float16 or "
            f"bfloat16, got {qs.dtype}"
        )
    shape = tuple(int(d) for d in qs.shape)
    n = math.prod(shape)
    if weight.dim() == 2 and weight.shape[0] == 1 and weight.shape[1] > 1:
        raise ValueError(
            f"weight has shape {_shape(weight)}, the transposed packed layout (weight.t()); "
            "pass the weight itself, [ceil(n/2) bytes, 1]"
        )
    if weight.dtype == torch.bool or weight.dtype.is_complex:
        raise TypeError(f"weight must be uint8 or a float quant_storage, got {weight.dtype}")
    if not weight.is_contiguous():
        raise ValueError(
            f"weight (the packed codes) must be contiguous, got strides {weight.stride()}"
        )
    nbytes = weight.numel() * weight.element_size()
    needed = (n + 1) // 2
    # A float quant_storage rounds the byte count up to whole storage elements.
    if not needed <= nbytes < needed + weight.element_size():
        raise ValueError(
            f"weight must hold the {needed} bytes of {n} 4-bit codes (quant_state.shape "
            f"{list(shape)}), got {nbytes} bytes ({weight.dtype}, shape {_shape(weight)}): "
            "is it a dense weight rather than a packed one?"
        )
    device = weight.device
    packed = weight.detach().reshape(-1).view(torch.uint8)[:needed]
    blocks = -(-n // qs.blocksize)
    if qs.nested:
        state2 = qs.state2
        blocksize2 = int(state2.blocksize)
        if blocksize2 < 1:
            raise ValueError(f"quant_state.state2.blocksize must be >= 1, got {blocksize2}")
        offset = qs.offset
        if not isinstance(offset, torch.Tensor):
            raise TypeError(
                f"quant_state.offset must be a float32 tensor, got {type(offset).__name__}"
            )
        return Packed4bit(
            packed=packed,
            absmax=_check_operand("quant_state.absmax", qs.absmax, blocks, device, torch.uint8),
            code=code_table(qs.quant_type, device),
            blocksize=int(qs.blocksize),
            shape=shape,
            dtype=qs.dtype,
            quant_type=qs.quant_type,
            absmax_code=_check_operand("quant_state.state2.code", state2.code, 256, device),
            absmax2=_check_operand(
                "quant_state.state2.absmax", state2.absmax, -(-blocks // blocksize2), device
            ),
            offset=_check_operand("quant_state.offset", offset, 1, device).reshape(()),
            blocksize2=blocksize2,
        )
    return Packed4bit(
        packed=packed,
        absmax=_check_operand("quant_state.absmax", qs.absmax, blocks, device),
        code=code_table(qs.quant_type, device),
        blocksize=int(qs.blocksize),
        shape=shape,
        dtype=qs.dtype,
        quant_type=qs.quant_type,
    )


# ---------------------------------------------------------------------------------------
# The public function
# ---------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result
def _choose_backend(device_type: str, requested: str | None) -> str:
    """The dequantize kernel for tensors of `device_type`: on CUDA the C++ extension's
    CUDA kernel, else Triton; on the CPU the C++ kernel; each where usable, else the
    reference. A requested one must be usable and serve the device. torch.compile runs
    it eagerly (its result is a constant)."""
    from . import backends

    if requested is None:
        preference = _PREFERENCE.get(device_type, ())
        requested = next((n for n in preference if backends.availability(n)[0]), "torch")
        if requested == "torch":
            return "torch"
    if requested not in DEQUANTIZE_BACKENDS:
        raise ValueError(
            f"backend must be one of {DEQUANTIZE_BACKENDS} or None for dequantize_4bit, "
            f"got {requested!r}"
        )
    if requested != "torch":
        usable, reason = backends.availability(requested)
        if not usable:
            raise RuntimeError(f"lora_kernels backend {requested!r} is not usable: {reason}")
        if not backends._serves(requested, device_type):
            raise RuntimeError(
                f"lora_kernels backend {requested!r} does not run on {device_type} tensors"
            )
        backends.backend_ops(requested)  # loads the ops (torch.compile: before tracing)
    return requested


def dequantize_4bit(weight, quant_state=None, *, out=None, backend=None) -> torch.Tensor:
    """The dense weight of a bitsandbytes 4-bit weight, bit-identical to
    `bitsandbytes.functional.dequantize_4bit(weight, quant_state)`.

    weight: a quantized `bitsandbytes.nn.Params4bit` (its `quant_state` is used), or
        the packed tensor ([ceil(N*K/2) bytes, 1] of uint8 or a float quant_storage)
        with `quant_state` given. nf4 or fp4, any blocksize, double quantization on
        or off.
    quant_state: a `bitsandbytes.functional.QuantState`; default `weight.quant_state`.
    out: optional contiguous tensor of `quant_state.shape` and `quant_state.dtype` on
        the weight's device, written and returned (a reusable workspace).
    backend: None (on CUDA the C++ extension's CUDA kernel, else Triton; on the CPU the
        C++ kernel; each where usable, else the PyTorch reference), "cuda", "triton",
        "cpu" or "torch".

    Returns the dense weight, `quant_state.shape` ([N, K] for a `Linear4bit`) in
    `quant_state.dtype`. Unlike bitsandbytes, the transposed packed layout
    (`weight.t()`, [1, n]) is refused rather than answered with a transpose.
    """
    w = read_4bit_weight(weight, quant_state)
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if tuple(out.shape) != w.shape or out.dtype != w.dtype or out.device != w.packed.device:
            raise ValueError(
                f"out must be a {w.dtype} tensor of shape {list(w.shape)} on "
                f"{w.packed.device} (quant_state.shape and .dtype), got {out.dtype} "
                f"{_shape(out)} on {out.device}"
            )
        if not out.is_contiguous():
            raise ValueError(f"out must be contiguous, got strides {out.stride()}")
    name = _choose_backend(w.packed.device.type, backend)
    if name == "torch":
        return dequantize_4bit_reference(w, out)
    if out is None:
        out = torch.empty(w.shape, dtype=w.dtype, device=w.packed.device)
    return dequantize_into(w, out, name)


def dequantize_into(w: Packed4bit, out: torch.Tensor, name: str) -> torch.Tensor:
    """The dense weight written into `out` (contiguous, `w.shape`, any float dtype: the
    float32 products are rounded once to it) by backend `name`, one that
    `_choose_backend` returned; `out` is returned."""
    if name == "torch":
        return dequantize_4bit_reference(w, out)
    if name in ("cpu", "cuda"):  # one op of the C++ extension, a kernel per device
        op = torch.ops.lora_kernels.cpp_dequantize_4bit
    else:
        from .backend_triton import dequant  # noqa: F401 (defines the op)

        op = torch.ops.lora_kernels.triton_dequantize_4bit
    op(w.packed, w.absmax, w.code, w.absmax_code, w.absmax2, w.offset,
       w.blocksize, w.blocksize2, out)  # fmt: skip
    return out
