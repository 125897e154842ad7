"""4-bit (bitsandbytes NF4 / FP4) dequantize on the GPU: one kernel, one launch.

The format and the reference decode are `lora_kernels/quant4bit.py`; this file is the
kernel, its launcher and the `torch.library` op the launcher runs in, top to bottom.
With double quantization the nested absmax is decoded in the same kernel: each program
decodes the scales of its own blocks, so no [blocks] float32 absmax is ever written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import interpreter
from .kernels import _cast

# Elements of the dense weight per program on a GPU (at least one quant block): 4096
# elements are 2 KiB of codes and 8 KiB of bf16 output, 32 elements per thread at 4 warps.
ELEMENTS_PER_PROGRAM = interpreter.DEQUANT_ELEMENTS if interpreter.ACTIVE else 4096
NUM_WARPS = 4


# Under the interpreter (NumPy: no inline PTX, no contraction) products are plain.
_INTERPRETED = tl.constexpr(interpreter.ACTIVE)


@triton.jit
def _mul_rn(a, b):
    """a * b rounded to float32 (`mul.rn`): never contracted with a following add into a
    fused multiply-add, whatever fp-fusion setting the kernel is compiled with."""
    if _INTERPRETED:
        return a * b
    return tl.inline_asm_elementwise(
        "mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b], dtype=tl.float32, is_pure=True, pack=1
    )


@triton.jit
def dequant_4bit_kernel(
    packed, absmax, code, absmax_code, absmax2, offset, out,
    n,
    NESTED: tl.constexpr,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    GROUP: tl.constexpr,
):  # fmt: skip
    """out[i] = code[c_i] * scale[i // BLOCKSIZE] for the n elements of the flattened
    weight, c_{2j} the high nibble of packed[j] and c_{2j+1} its low nibble; one program
    per GROUP consecutive quant blocks.

    scale = absmax (float32 [blocks]), or with NESTED scale[b] = absmax_code[absmax[b]] *
    absmax2[b // BLOCKSIZE2] + offset (absmax uint8 [blocks], absmax_code float32 [256],
    absmax2 float32, offset float32 []), the product rounded before the offset is added
    (`_mul_rn`), as bitsandbytes computes it.
    """
    i_g = tl.program_id(0).to(tl.int64)
    o_b = i_g * GROUP + tl.arange(0, GROUP).to(tl.int64)  # quant blocks of this program
    m_b = o_b * BLOCKSIZE < n
    if NESTED:
        b_q = tl.load(absmax + o_b, mask=m_b, other=0)
        b_scale2 = tl.load(absmax2 + o_b // BLOCKSIZE2, mask=m_b, other=0.0)
        b_scale = _mul_rn(tl.load(absmax_code + b_q.to(tl.int32)), b_scale2) + tl.load(offset)
    else:
        b_scale = tl.load(absmax + o_b, mask=m_b, other=0.0)  # [GROUP]

    o_j = o_b[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    b_byte = tl.load(packed + o_j, mask=o_j < (n + 1) // 2, other=0)  # [GROUP, BLOCKSIZE/2]
    b_hi = tl.load(code + (b_byte >> 4).to(tl.int32))
    b_lo = tl.load(code + (b_byte & 0xF).to(tl.int32))
    # Elements 2j and 2j + 1 side by side: [GROUP, BLOCKSIZE], in the weight's order.
    b_w = tl.interleave(b_hi, b_lo) * b_scale[:, None]

    o_i = o_b[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out + o_i, _cast(b_w, out.dtype.element_ty), mask=o_i < n)


def launch_dequant_4bit(
    packed, absmax, code, absmax_code, absmax2, offset, blocksize: int, blocksize2: int, out
) -> None:
    """out (contiguous, n elements) = the decode of packed [ceil(n/2)] uint8; absmax_code,
    absmax2 and offset are None without double quantization."""
    n = out.numel()
    if n == 0:
        return
    group = max(1, ELEMENTS_PER_PROGRAM // blocksize)
    grid = (triton.cdiv(triton.cdiv(n, blocksize), group),)
    wrap_triton(dequant_4bit_kernel)[grid](
        packed, absmax, code, absmax_code, absmax2, offset, out,
        n,
        NESTED=absmax2 is not None,
        BLOCKSIZE=blocksize,
        BLOCKSIZE2=blocksize2,
        GROUP=group,
        num_warps=NUM_WARPS,
    )  # fmt: skip


def _check_op_inputs(packed, absmax, blocksize: int, out) -> None:
    """What the kernel assumes of its operands (`quant4bit.read_4bit_weight` checks the
    rest before the public function calls the op)."""
    n = out.numel()
    if packed.dtype != torch.uint8 or packed.dim() != 1 or 2 * packed.numel() < n:
        raise ValueError(
            f"packed must be 1-D uint8 with at least {(n + 1) // 2} bytes, got "
            f"{packed.dtype} of shape {list(packed.shape)}"
        )
    if blocksize < 2 or blocksize & (blocksize - 1) or absmax.numel() != -(-n // blocksize):
        raise ValueError(
            f"blocksize must be a power of two >= 2 with one absmax per block, got "
            f"blocksize {blocksize} and {absmax.numel()} absmax for {n} elements"
        )
    if not out.is_contiguous() or out.device != packed.device:
        raise ValueError(f"out must be contiguous and on {packed.device}, got {out.device}")


@triton_op("lora_kernels::triton_dequantize_4bit", mutates_args={"out"})
def triton_dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    absmax_code: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    blocksize2: int,
    out: torch.Tensor,
) -> None:
    _check_op_inputs(packed, absmax, blocksize, out)
    with interpreter.one_at_a_time():
        launch_dequant_4bit(
            packed, absmax, code, absmax_code, absmax2, offset, blocksize, blocksize2, out
        )


@triton_dequantize_4bit.register_fake
def _(packed, absmax, code, absmax_code, absmax2, offset, blocksize, blocksize2, out):
    """Writes `out` only: nothing to shape (and the interpreter cannot run fake tensors)."""
    return None
