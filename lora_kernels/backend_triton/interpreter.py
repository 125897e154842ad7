"""What differs under TRITON_INTERPRET=1, where the kernels run on CPU tensors.

`triton.jit` makes an interpreted function or a compiled one when a kernel is defined,
so the mode is fixed when this package is imported: `ACTIVE`, which every launcher and
the backend contract read. Changing TRITON_INTERPRET later changes nothing: kernels
defined for the GPU keep running on CUDA tensors, interpreted ones on CPU tensors. What
cannot work, CPU tensors after TRITON_INTERPRET=1 was set too late, fails with a message
that says so (`late_switch`).

Everything special-cased for the interpreter lives here: its bfloat16 fixes (a constexpr
the kernels read), Triton 3.6's scalar `__index__` under NumPy 2.4, its lock, its one
small config per kernel and its host-chosen sizes.
"""

from __future__ import annotations

import contextlib
import operator
import threading
import warnings

import triton
import triton.language as tl

from .configs import LaunchSizes

ACTIVE = bool(triton.knobs.runtime.interpret)


def _fix_scalar_index() -> bool:
    """Install the upstream fix of the interpreter's `tl.tensor.__index__` where it is
    broken (True: installed; False: not needed, or an interpreter laid out otherwise).

    The interpreter holds a scalar (a kernel argument such as K or R, a program id) as
    a 1-element 1-D numpy array, and Triton 3.6's `__index__` is `int(self.handle.data)`:
    NumPy 2.4 refuses int() of an array with ndim > 0 ("only 0-dimensional arrays can be
    converted to Python scalars", deprecated since NumPy 1.25), so every loop whose
    bound is a runtime scalar (`range(0, K, BLOCK_K)`, `tl.range(0, R, BLOCK_R)`) fails
    on its first use. Upstream fixed it (triton-lang/triton#9171) with
    `int(self.handle.data.squeeze())`, the code of Triton 3.9. Gated on the behaviour,
    probed once here (the TypeError, or NumPy's deprecation warning before 2.4), not on
    version numbers; the fix then joins the attributes the interpreter sets on
    `tl.tensor` for each launch (and restores after it). Compiled kernels never run
    the interpreter's code, so they are unaffected.
    """
    import numpy as np

    try:
        from triton.runtime import interpreter as ti

        patch_tensor = ti._patch_lang_tensor
        scope = ti._LangPatchScope()
        handle = ti.TensorHandle(np.array([1], dtype=np.int32), tl.int32)
    except (ImportError, AttributeError):
        return False
    try:
        patch_tensor(tl.core.tensor, scope)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            if operator.index(tl.core.tensor(handle, tl.int32)) == 1:
                return False
    except (TypeError, DeprecationWarning):
        pass
    finally:
        scope.restore()

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    ti._patch_lang_tensor = _patch_lang_tensor
    return True


SCALAR_INDEX_FIX = ACTIVE and _fix_scalar_index()

# Two bfloat16 defects of Triton 3.9's interpreter, worked around only under it: tl.dot
# multiplies bf16 operands as their raw uint16 bits (kernels._dot widens them to fp32
# first: exact, same fp32 accumulation), and fp32 -> bf16 casts truncate where the GPU
# rounds to nearest even (kernels._cast rounds the fp32 bits first).
BF16_FIX = tl.constexpr(ACTIVE)

# Small, so that the tests' shapes (M up to 129, R up to 256) take several tiles, R-steps
# and splits on every path.
SIZES = LaunchSizes(
    r_step_max=32,
    r_tile_max=32,
    r_tile_max_fma=32,
    n_chunk_align=16,
    m_chunk_align=32,
    dy_rows=16,
    dy_rows_wide_r=16,
    dy_rows_fma=16,
    sum_block_t=4,
    sum_block_l=64,
    mask_block_m=16,
    mask_block_k=32,
)
# How many programs a split aims for (two per SM on a GPU).
TARGET_PROGRAMS = 4
# Elements of the dense weight per program of the 4-bit dequantize (dequant.py; at least
# one quant block): small, so that the tests' weights take many programs.
DEQUANT_ELEMENTS = 128

_BLOCKS = {
    "fwd": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2},
    "bwd_dx": {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_N": 32, "GROUP_M": 2},
    "shrink": {"BLOCK_M": 16, "BLOCK_K": 32},
    "bwd_dy": {"BLOCK_N": 16},
    "bwd_da": {"BLOCK_K": 32, "BLOCK_M": 16},
    "bwd_db": {"BLOCK_N": 16, "BLOCK_M": 16},
}


def config(name: str) -> triton.Config:
    """The one config of kernel `name` under the interpreter."""
    return triton.Config(_BLOCKS[name], num_warps=4, num_stages=1)


# Triton's interpreter keeps global state while a kernel runs and is not thread-safe:
# under it, one op at a time (compiled kernels need no lock).
_LOCK = threading.Lock()


def one_at_a_time():
    """The interpreter's lock under TRITON_INTERPRET=1, else a no-op context."""
    return _LOCK if ACTIVE else contextlib.nullcontext()


def late_switch() -> str:
    """Why CPU tensors are refused although TRITON_INTERPRET=1 is set now ("" if not)."""
    if ACTIVE or not triton.knobs.runtime.interpret:
        return ""
    return (
        "TRITON_INTERPRET=1 was set after lora_kernels was imported, when the kernels "
        "had already been defined for the GPU (triton.jit decides when a kernel is "
        "defined); set it before importing lora_kernels"
    )
