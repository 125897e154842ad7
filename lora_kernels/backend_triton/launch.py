"""Host launchers of the triton backend: one `launch_<kernel>` per kernel, and the
forward and backward passes written as a few of those calls.

Every launcher takes the tensors it reads and writes and a `Launch` (device target,
dot precision, host-chosen sizes); buffers of partial sums are allocated here with
`torch.empty`, each element of them written by a kernel before it is read. Launches
go through `wrap_triton`, so that `torch.compile` traces them. No launcher reads a
tensor's value on the host (`.item()`), so the ops stay traceable.
"""

from __future__ import annotations

import functools
import math
import os
import typing

import torch
import triton
from torch.library import wrap_triton as _wrap_triton

from .. import reference
from ..contract import check_backward_inputs, check_bias, check_op_inputs, keep_bits_shape
from . import configs, interpreter, kernels
from .configs import LaunchSizes

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
F32 = torch.float32

_JIT_KERNELS = {
    "shrink": kernels.lora_shrink_kernel,
    "fwd": kernels.lora_fwd_kernel,
    "bwd_dy": kernels.lora_bwd_dy_kernel,
    "bwd_dx": kernels.lora_bwd_dx_kernel,
    "bwd_da": kernels.lora_bwd_da_kernel,
    "bwd_db": kernels.lora_bwd_db_kernel,
}


# ---------------------------------------------------------------------------------------
# The device, the autotuner and the launch parameters
# ---------------------------------------------------------------------------------------


@functools.cache
def _device_target(device_index: int) -> tuple[tuple[int, int], int]:
    """(compute capability, opt-in shared memory per block in bytes) of a CUDA device."""
    props = torch.cuda.get_device_properties(device_index)
    capability = (props.major, props.minor)
    limit = getattr(props, "shared_memory_per_block_optin", 0)
    if not limit:
        limit = configs.SHARED_MEMORY_LIMIT.get(capability, configs.DEFAULT_SHARED_MEMORY)
    return capability, int(limit)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# (kernel name, target) -> its autotuner, for `autotune_choices`.
TUNERS: dict[tuple, triton.runtime.Autotuner] = {}


def max_configs() -> int | None:
    """How many configs each launch autotunes over at most (`LORA_KERNELS_MAX_CONFIGS`,
    the first ones in `configs.candidates` order that pass the checks): a cap on
    compile time for short runs such as gpu-check's; unset: all of them."""
    value = os.environ.get("LORA_KERNELS_MAX_CONFIGS", "")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"LORA_KERNELS_MAX_CONFIGS must be a positive integer, got {value!r}")
    return int(value)


def autotune_choices() -> list[dict]:
    """The config each autotuned kernel chose, per autotune key, in this process."""
    return [
        {
            "kernel": name,
            "capability": list(target[0]),
            "key": [str(k) for k in key],
            "config": {**config.kwargs, "num_warps": config.num_warps},
            "num_stages": config.num_stages,
        }
        for (name, target), tuner in TUNERS.items()
        for key, config in tuner.cache.items()
    ]


@functools.cache
def tuned(name: str, target: tuple | None):
    """Kernel `name` under triton.autotune for a device `target` = (capability, shared
    memory limit), its candidates pruned to `configs.kernel_configs` per launch, then to
    those that compile without spilling (`spill_free`); None: the interpreter, one small
    config."""
    kernel = _JIT_KERNELS[name]
    keys = configs.AUTOTUNE_KEYS[name]
    if target is None:
        return triton.autotune([interpreter.config(name)], key=keys)(kernel)
    capability, smem_limit = target

    def prune(candidates, named_args, **kwargs):
        allowed = configs.kernel_configs(
            name,
            capability=capability,
            smem_limit=smem_limit,
            dtype=named_args[configs.DTYPE_ARG[name]].dtype,
            BLOCK_R=kwargs["BLOCK_R"],
            INPUT_PRECISION=kwargs["INPUT_PRECISION"],
            HAS_DROPOUT=kwargs.get("HAS_DROPOUT", False),
            DROPPED_BASE=kwargs.get("DROPPED_BASE", False),
        )
        allowed_keys = {configs.config_key(c) for c in allowed}
        estimated = [c for c in candidates if configs.config_key(c) in allowed_keys]
        return spill_free(name, kernel, estimated, named_args, kwargs, max_configs())

    tuner = triton.autotune(
        configs.all_candidates(name), key=keys, prune_configs_by={"early_config_prune": prune}
    )(kernel)
    TUNERS[name, target] = tuner
    return tuner


def wrap_triton(kernel):
    """`torch.library.wrap_triton(kernel)`, so that torch.compile traces the launch; the
    kernel itself under the interpreter, whose kernels torch 2.12 and older refuse to wrap
    (torch 2.13's wrap_triton returns them unwrapped too)."""
    return kernel if interpreter.ACTIVE else _wrap_triton(kernel)


# (kernel name, config key) -> Triton's n_spills (local memory, in 32-bit words) of every
# config `spill_free` dropped on this machine; gpu-check reports them.
SPILLED: dict[tuple, int] = {}


def _compilable(named_args: dict) -> bool:
    """Whether a launch's tensors are real CUDA tensors (not torch.compile's fake or meta
    tensors, which can compile nothing), so that its configs can be compiled here."""
    tensors = [v for v in named_args.values() if isinstance(v, torch.Tensor)]
    return bool(tensors) and all(
        t.device.type == "cuda" and not torch._subclasses.fake_tensor.is_fake(t) for t in tensors
    )


def spill_free(
    name: str, kernel, estimated: list, named_args: dict, kwargs: dict, limit: int | None = None
) -> list:
    """The configs of `estimated` that the installed Triton compiles for this launch
    without spilling registers (all of them if every one spills, or if nothing can be
    compiled here: fake tensors, tensors not on a CUDA device); with `limit`, the first
    `limit` of those.

    The register estimate prunes by tile sizes, but whether ptxas spills a config also
    depends on its occupancy heuristics, which change between Triton/ptxas versions: the
    same shrink tile gets 56 registers and spills on one version, 62 and no spill on the
    next. Compiling is what the autotuner does next anyway (the compiled kernel stays in
    Triton's cache), so each config is compiled here and its local memory read off the
    loaded binary.
    """
    if len(estimated) < 2 or not _compilable(named_args):
        return estimated[:limit]
    clean = []
    for config in estimated:
        if limit is not None and len(clean) == limit:
            break
        try:
            compiled = kernel.warmup(grid=(1,), **named_args, **kwargs, **config.all_kwargs())
            compiled._init_handles()
            spilled = int(compiled.n_spills)
        except triton.runtime.errors.OutOfResources:
            continue
        if spilled > 0:
            SPILLED[name, configs.config_key(config)] = spilled
        else:
            clean.append(config)
    return clean or estimated[:limit]


class Launch(typing.NamedTuple):
    """What every launch of one op call shares."""

    target: tuple | None  # (capability, shared memory limit); None under the interpreter
    programs: int  # how many programs keep the device busy
    precision: str  # tl.dot's input_precision for x's dtype
    fma: bool  # fp32 without TF32: dots on the FMA units, smaller tiles
    rank_tf32: bool  # half-precision x: the rank-R products in fp32 on TF32
    sizes: LaunchSizes


def launch_params(x: torch.Tensor) -> Launch:
    """The `Launch` of an op call on x (its device and dtype)."""
    if interpreter.ACTIVE:
        target, programs, sizes = None, interpreter.TARGET_PROGRAMS, interpreter.SIZES
    else:
        index = x.device.index if x.device.index is not None else 0
        target, programs, sizes = _device_target(index), 2 * _sm_count(index), configs.GPU_SIZES
    # TF32 for float32 exactly when torch allows it (the interpreter has no TF32).
    tf32 = not interpreter.ACTIVE and torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if x.dtype == torch.float32 and tf32 else "ieee"
    fma = x.dtype == torch.float32 and precision == "ieee"
    return Launch(target, programs, precision, fma, x.dtype != torch.float32, sizes)


def dropout_args(dropout_p: float) -> tuple[bool, int, float]:
    """(has dropout, threshold as the int32 bit pattern of the uint32 T, 1 / (1 - p)).

    Dropout is on for every p > 0, as for the contract's keep_bits: a p below 2^-32 has
    T = 0, keeps everything and still has its (all-ones) bits written and read.
    """
    threshold = reference.dropout_threshold(dropout_p)
    if dropout_p == 0.0:
        return False, 0, 1.0
    # Passed as int32 (so the kernel's signature never changes), reinterpreted as uint32.
    signed = threshold - 2**32 if threshold >= 2**31 else threshold
    return True, signed, reference.dropout_scale(dropout_p)


def split(total: int, other_programs: int, align: int, target: int) -> tuple[int, int]:
    """(chunk, splits) cutting `total` into aligned chunks so that splits * other_programs
    reaches `target`."""
    if total == 0:
        return align, 1
    splits = max(1, min(math.ceil(target / max(other_programs, 1)), math.ceil(total / align)))
    chunk = math.ceil(math.ceil(total / splits) / align) * align
    return chunk, math.ceil(total / chunk)


def _bits_strides(keep_bits: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if keep_bits is None else (keep_bits.stride(0), keep_bits.stride(-1))


# ---------------------------------------------------------------------------------------
# One launcher per kernel
# ---------------------------------------------------------------------------------------


def launch_shrink(lp: Launch, x, lora_A, u, keep_bits, seed, threshold, dropout_scale) -> None:
    """U = D(X) A^T into u [M, R] fp32 and, with dropout (keep_bits not None), the mask's
    bits into keep_bits [M, ceil(K/8)]."""
    M, K = x.shape
    R = lora_A.shape[0]
    BLOCK_R = lp.sizes.r_tile_block(R, lp.fma)
    # At least one R-tile: its programs write the mask's bits (R = 0 in a direct op call).
    r_tiles = max(triton.cdiv(R, BLOCK_R), 1)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), r_tiles)
    s_km, s_kb = _bits_strides(keep_bits)
    wrap_triton(tuned("shrink", lp.target))[grid](
        x, lora_A, u, keep_bits, seed,
        M, K, R,
        x.stride(0), x.stride(1), lora_A.stride(0), lora_A.stride(1),
        u.stride(0), u.stride(1), s_km, s_kb,
        threshold, dropout_scale,
        HAS_DROPOUT=keep_bits is not None,
        INPUT_PRECISION=lp.precision,
        BLOCK_R=BLOCK_R,
    )  # fmt: skip


class DoraForward(typing.NamedTuple):
    """DoRA's additions to the forward GEMM (`kernels.lora_fwd_kernel`): g = m / n [N]
    fp32 and, with dropout, c = (g - 1) / (1 - p) [N] fp32, the keep mask's bits and
    the buffer [M, N] for P = (X * keep) W^T (base_scale, keep_bits, dropped None
    without dropout)."""

    row_scale: torch.Tensor
    base_scale: torch.Tensor | None = None
    keep_bits: torch.Tensor | None = None
    dropped: torch.Tensor | None = None


def launch_fwd(lp: Launch, x, weight, bias, u, lora_B, y, scaling, dora=None) -> None:
    """Y = X W^T + b + s U B^T into y [M, N]; bias may be None; `dora` a DoraForward."""
    M, K = x.shape
    N, R = lora_B.shape
    if dora is None:
        dora = DoraForward(None)
    dropped_base = dora.dropped is not None
    bits, dropped = dora.keep_bits, dora.dropped
    s_km, s_kb = _bits_strides(bits)
    s_pm, s_pn = (dropped.stride(0), dropped.stride(1)) if dropped_base else (0, 0)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
    wrap_triton(tuned("fwd", lp.target))[grid](
        x, weight, bias, u, lora_B, y, scaling,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        u.stride(0), u.stride(1), lora_B.stride(0), lora_B.stride(1),
        y.stride(0), y.stride(1),
        dora.row_scale, dora.base_scale, bits, dropped, s_km, s_kb, s_pm, s_pn,
        HAS_BIAS=bias is not None,
        ROW_SCALE=dora.row_scale is not None and not dropped_base,
        DROPPED_BASE=dropped_base,
        INPUT_PRECISION=lp.precision,
        RANK_TF32=lp.rank_tf32,
        BLOCK_R=lp.sizes.r_step_block(R),
    )  # fmt: skip


class DyPartials(typing.NamedTuple):
    """The fp32 partial sums of the dY pass, None where not asked for."""

    g: torch.Tensor | None  # [N_SPLIT, M, R]
    db: torch.Tensor | None  # [M_TILES, N, R], unscaled
    dbias: torch.Tensor | None  # [M_TILES, N]
    ds: torch.Tensor | None  # [programs]
    dm: torch.Tensor | None = None  # [M_TILES, N], DoRA's sum of dY * kept


def launch_bwd_dy(lp: Launch, grad_y, lora_B, u, need_g, need_db, need_ds, need_dbias,
                  row_scale=None, kept=None):  # fmt: skip
    """One pass over dY [M, N]: partial sums of G = dY B, dB = dY^T U, db and ds, as the
    flags ask (`DyPartials`). DoRA: B is diag(row_scale) B where row_scale [N] fp32 is
    given, and the partial sums of dY * kept are made where kept [M, N] is given."""
    M, N = grad_y.shape
    R = lora_B.shape[1]
    BLOCK_R = lp.sizes.r_tile_block(R, lp.fma)
    BLOCK_M = lp.sizes.dy_block_m(BLOCK_R, lp.fma)
    m_tiles = triton.cdiv(M, BLOCK_M)
    r_tiles = triton.cdiv(R, BLOCK_R)
    n_chunk, n_split = split(N, m_tiles * r_tiles, lp.sizes.n_chunk_align, lp.programs)
    device = grad_y.device
    part = DyPartials(
        torch.empty((n_split, M, R), dtype=F32, device=device) if need_g else None,
        torch.empty((m_tiles, N, R), dtype=F32, device=device) if need_db else None,
        torch.empty((m_tiles, N), dtype=F32, device=device) if need_dbias else None,
        torch.empty((m_tiles * n_split * r_tiles,), dtype=F32, device=device) if need_ds else None,
        torch.empty((m_tiles, N), dtype=F32, device=device) if kept is not None else None,
    )
    s_pm, s_pn = (kept.stride(0), kept.stride(1)) if kept is not None else (0, 0)
    wrap_triton(tuned("bwd_dy", lp.target))[(m_tiles, n_split, r_tiles)](
        grad_y, lora_B, u, part.g, part.db, part.dbias, part.ds,
        M, N, R, n_chunk,
        grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1),
        u.stride(0), u.stride(1),
        row_scale, kept, part.dm, s_pm, s_pn,
        NEED_G=need_g,
        COMPUTE_DB=need_db,
        COMPUTE_DS=need_ds,
        COMPUTE_DBIAS=need_dbias,
        ROW_SCALE=row_scale is not None,
        COMPUTE_DM=kept is not None,
        INPUT_PRECISION=lp.precision,
        RANK_TF32=lp.rank_tf32,
        BLOCK_M=BLOCK_M,
        BLOCK_R=BLOCK_R,
    )  # fmt: skip
    return part


def launch_bwd_dx(lp: Launch, grad_y, weight, g, lora_A, grad_x, scaling, keep_bits, scale,
                  row_scale=None):  # fmt: skip
    """dX = s D(G A) + dY W into grad_x [M, K]; keep_bits None without dropout, scale the
    1 / (1 - p) of dropout. DoRA, with row_scale r [N] fp32: dY W becomes
    (dY diag(r)) W without dropout (r = g), and dY W + keep * ((dY diag(r)) W) with it
    (r = (g - 1) / (1 - p))."""
    M, K = grad_x.shape
    N = grad_y.shape[1]
    R = lora_A.shape[0]
    s_km, s_kb = _bits_strides(keep_bits)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(K, META["BLOCK_K"]),)
    wrap_triton(tuned("bwd_dx", lp.target))[grid](
        grad_y, weight, g, lora_A, grad_x, scaling, keep_bits,
        M, N, K, R,
        grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
        g.stride(0), g.stride(1), lora_A.stride(0), lora_A.stride(1),
        grad_x.stride(0), grad_x.stride(1), s_km, s_kb,
        scale, row_scale,
        HAS_DROPOUT=keep_bits is not None,
        ROW_SCALE=row_scale is not None and keep_bits is None,
        DROPPED_BASE=row_scale is not None and keep_bits is not None,
        INPUT_PRECISION=lp.precision,
        RANK_TF32=lp.rank_tf32,
        BLOCK_R=lp.sizes.r_step_block(R),
    )  # fmt: skip


def launch_bwd_da(lp: Launch, g, x, keep_bits) -> torch.Tensor:
    """fp32 partials [M_SPLIT, R, K] of G^T D(X) (unscaled), split over M; keep_bits None
    without dropout."""
    M, K = x.shape
    R = g.shape[1]
    BLOCK_R = lp.sizes.r_tile_block(R, lp.fma)
    other = triton.cdiv(R, BLOCK_R) * triton.cdiv(K, 128)
    m_chunk, m_split = split(M, other, lp.sizes.m_chunk_align, lp.programs)
    da_part = torch.empty((m_split, R, K), dtype=F32, device=x.device)
    s_km, s_kb = _bits_strides(keep_bits)
    grid = lambda META: (triton.cdiv(R, BLOCK_R) * triton.cdiv(K, META["BLOCK_K"]), m_split)
    wrap_triton(tuned("bwd_da", lp.target))[grid](
        g, x, da_part, keep_bits,
        M, R, K, m_chunk,
        g.stride(0), g.stride(1), x.stride(0), x.stride(1), s_km, s_kb,
        HAS_DROPOUT=keep_bits is not None,
        INPUT_PRECISION=lp.precision,
        RANK_TF32=lp.rank_tf32,
        BLOCK_R=BLOCK_R,
    )  # fmt: skip
    return da_part


def launch_bwd_db(lp: Launch, grad_y, u) -> torch.Tensor:
    """fp32 partials [M_SPLIT, N, R] of dY^T U (unscaled), split over M."""
    M, N = grad_y.shape
    R = u.shape[1]
    BLOCK_R = lp.sizes.r_tile_block(R, lp.fma)
    other = triton.cdiv(N, 128) * triton.cdiv(R, BLOCK_R)
    m_chunk, m_split = split(M, other, lp.sizes.m_chunk_align, lp.programs)
    db_part = torch.empty((m_split, N, R), dtype=F32, device=u.device)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_N"]) * triton.cdiv(R, BLOCK_R), m_split)
    wrap_triton(tuned("bwd_db", lp.target))[grid](
        grad_y, u, db_part,
        M, N, R, m_chunk,
        grad_y.stride(0), grad_y.stride(1), u.stride(0), u.stride(1),
        INPUT_PRECISION=lp.precision,
        RANK_TF32=lp.rank_tf32,
        BLOCK_R=BLOCK_R,
    )  # fmt: skip
    return db_part


def launch_sum_partials(sizes: LaunchSizes, part, out, scale: float, scaling) -> None:
    """out = scale (* scaling) * part.sum(0) for part [T, *out.shape] fp32; scaling may
    be None."""
    T = part.shape[0]
    L = out.numel()
    if L == 0:
        return
    grid = (triton.cdiv(L, sizes.sum_block_l),)
    wrap_triton(kernels.sum_partials_kernel)[grid](
        part, out, scaling,
        T, L, scale,
        HAS_SCALING=scaling is not None,
        BLOCK_T=sizes.sum_block_t,
        BLOCK_L=sizes.sum_block_l,
    )  # fmt: skip


def launch_dropout_mask(sizes: LaunchSizes, seed, threshold: int, out, K: int, pack: bool):
    """The mask [M, K] of a p > 0 from the seed into out: [M, ceil(K/8)] uint8 bits if
    pack, else [M, K] int8 0/1. Takes no lock (callers hold it)."""
    M = out.shape[0]
    if M == 0 or K == 0:
        return
    grid = (triton.cdiv(M, sizes.mask_block_m), triton.cdiv(K, sizes.mask_block_k))
    wrap_triton(kernels.dropout_mask_kernel)[grid](
        out, seed,
        M, K, out.stride(0), out.stride(1),
        threshold,
        PACK_BITS=pack,
        BLOCK_M=sizes.mask_block_m,
        BLOCK_K=sizes.mask_block_k,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# Checks, forward and backward
# ---------------------------------------------------------------------------------------


def check_inputs(x, weight, lora_A, lora_B, scaling, dropout_p, seed) -> None:
    """The contract's checks of the op inputs, then the triton backend's device."""
    check_op_inputs("triton", DTYPES, x, weight, lora_A, lora_B, scaling, dropout_p, seed)
    device = x.device
    if device.type != "cuda" and not (interpreter.ACTIVE and device.type == "cpu"):
        why = interpreter.late_switch() or (
            "CPU tensors need TRITON_INTERPRET=1 set before lora_kernels is imported"
        )
        raise ValueError(f"x must be a CUDA tensor for the triton backend ({why}), got {device}")


def forward_into(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, y, u, keep_bits,
                 dora=None):  # fmt: skip
    """Write Y [M, N] into y, U [M, R] (fp32) into u and, with dropout, the keep mask
    packed one bit per element into keep_bits [M, ceil(K/8)] uint8 (else keep_bits is
    the empty [0]); launches nothing when M == 0. `dora`: a DoraForward (its keep_bits
    filled in here), for DoRA's Y and, with dropout, P."""
    check_inputs(x, weight, lora_A, lora_B, scaling, dropout_p, seed)
    check_bias(bias, x, weight)
    has_dropout, threshold, dropout_scale = dropout_args(dropout_p)
    if x.shape[0] == 0:
        return
    lp = launch_params(x)
    bits = keep_bits if has_dropout else None
    launch_shrink(lp, x, lora_A, u, bits, seed, threshold, dropout_scale)
    if dora is not None and has_dropout:
        dora = dora._replace(keep_bits=bits)
    if weight.shape[0] > 0:
        launch_fwd(lp, x, weight, bias, u, lora_B, y, scaling, dora)


class Grads(typing.NamedTuple):
    """The backward op's output buffers; None where the gradient is not wanted."""

    x: torch.Tensor | None  # [M, K], x's dtype
    A: torch.Tensor | None  # [R, K], the adapters' dtype (with B)
    B: torch.Tensor | None  # [N, R]
    scaling: torch.Tensor | None  # [], fp32
    bias: torch.Tensor | None  # [N], x's dtype


class DoraBackward(typing.NamedTuple):
    """DoRA's additions to the backward passes: g = m / n [N] fp32 (B is diag(g) B, and
    without dropout W is diag(g) W), c = (g - 1) / (1 - p) [N] fp32 with dropout (dX
    gains keep * ((dY diag(c)) W)), and the column sums dm is formed from, written where
    their buffers [N] fp32 are given: sum over rows of dY * kept (kept [M, N]: Y, or P
    with dropout) and of dY. The gradient of B is that of diag(g) B."""

    row_scale: torch.Tensor
    base_scale: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    kept_sum: torch.Tensor | None = None
    dy_sum: torch.Tensor | None = None


def backward_into(grad_y, x, weight, lora_A, lora_B, scaling, dropout_p, seed, u, keep_bits,
                  grads: Grads, dora: DoraBackward | None = None) -> None:  # fmt: skip
    """Write the gradients asked for into `grads`' buffers (and `dora`'s column sums).

    With dropout the keep mask is read from keep_bits [M, ceil(K/8)] uint8; an empty
    keep_bits (shape [0]) has the mask made from the seed first.
    """
    check_inputs(x, weight, lora_A, lora_B, scaling, dropout_p, seed)
    check_backward_inputs(x, weight, lora_A, grad_y, u, keep_bits, dropout_p)
    M, K = x.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    need_lora = grads.A is not None
    if dora is None:
        dora = DoraBackward(None)
    if M == 0:
        # Sums over no rows: zeros; no launch.
        for out in (grads.A, grads.B, grads.scaling, grads.bias, dora.kept_sum, dora.dy_sum):
            if out is not None:
                out.zero_()
        return
    lp = launch_params(x)
    has_dropout, threshold, dropout_scale = dropout_args(dropout_p)
    if not has_dropout:
        keep_bits = None
    elif tuple(keep_bits.shape) == (0,) and (grads.x is not None or need_lora):
        # No saved bits (a direct op call): the mask from the seed, packed, then read.
        keep_bits = torch.empty(
            keep_bits_shape(M, K, dropout_p), dtype=torch.uint8, device=x.device
        )
        launch_dropout_mask(lp.sizes, seed, threshold, keep_bits, K, pack=True)

    # 3. One pass over dY: G (partials over N-chunks), dB, db and ds partials.
    need_g = grads.x is not None or need_lora or grads.scaling is not None
    fused_db = need_lora and R <= configs.FUSED_DB_MAX_R
    g = None
    kept = dora.kept if dora.kept_sum is not None else None
    need_dbias = grads.bias is not None or dora.dy_sum is not None
    if need_g or need_dbias or kept is not None:
        need_ds = grads.scaling is not None
        part = launch_bwd_dy(lp, grad_y, lora_B, u, need_g, fused_db, need_ds, need_dbias,
                             dora.row_scale, kept)  # fmt: skip
        if need_g:
            g = part.g[0]
            if part.g.shape[0] > 1:
                g = torch.empty((M, R), dtype=F32, device=x.device)
                launch_sum_partials(lp.sizes, part.g, g, 1.0, None)
        if fused_db:
            launch_sum_partials(lp.sizes, part.db, grads.B, 1.0, scaling)
        for out in (grads.bias, dora.dy_sum):
            if out is not None:
                launch_sum_partials(lp.sizes, part.dbias, out, 1.0, None)
        if need_ds:
            launch_sum_partials(lp.sizes, part.ds, grads.scaling, 1.0, None)
        if kept is not None:
            launch_sum_partials(lp.sizes, part.dm, dora.kept_sum, 1.0, None)

    # 4. dX = s D(G A) + dY W.
    if grads.x is not None and K > 0:
        dx_scale = dora.row_scale if keep_bits is None else dora.base_scale
        launch_bwd_dx(lp, grad_y, weight, g, lora_A, grads.x, scaling, keep_bits, dropout_scale,
                      dx_scale)  # fmt: skip

    # 5. dA = s G^T D(X) (and dB = s dY^T U when not fused), split over M.
    if need_lora and K > 0:
        da_part = launch_bwd_da(lp, g, x, keep_bits)
        launch_sum_partials(lp.sizes, da_part, grads.A, dropout_scale, scaling)
    if need_lora and not fused_db and N > 0:
        db_part = launch_bwd_db(lp, grad_y, u)
        launch_sum_partials(lp.sizes, db_part, grads.B, 1.0, scaling)


# ---------------------------------------------------------------------------------------
# The keep mask alone (for tests against the reference)
# ---------------------------------------------------------------------------------------


def _check_seed(seed) -> None:
    if not isinstance(seed, torch.Tensor) or seed.shape != () or seed.dtype != torch.int64:
        raise TypeError(f"seed must be a 0-dim int64 tensor, got {seed!r:.80}")


def _mask_sizes() -> LaunchSizes:
    return interpreter.SIZES if interpreter.ACTIVE else configs.GPU_SIZES


def keep_mask_bytes(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The keep mask [M, K] as int8 0/1, written by `dropout_mask_kernel`."""
    _check_seed(seed)
    keep = torch.empty((M, K), dtype=torch.int8, device=seed.device)
    has_dropout, threshold, _ = dropout_args(p)
    if not has_dropout:
        return keep.fill_(1)
    with interpreter.one_at_a_time():
        launch_dropout_mask(_mask_sizes(), seed, threshold, keep, K, pack=False)
    return keep


def keep_mask_bits(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The keep mask packed one bit per element, [M, ceil(K/8)] uint8, written by
    `dropout_mask_kernel` alone (what backward makes when given no bits); p > 0."""
    _check_seed(seed)
    has_dropout, threshold, _ = dropout_args(p)
    if not has_dropout:
        raise ValueError(f"the packed keep mask exists only for dropout_p > 0, got {p!r}")
    keep_bits = torch.empty((M, (K + 7) // 8), dtype=torch.uint8, device=seed.device)
    with interpreter.one_at_a_time():
        launch_dropout_mask(_mask_sizes(), seed, threshold, keep_bits, K, pack=True)
    return keep_bits
