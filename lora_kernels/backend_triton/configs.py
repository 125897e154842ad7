"""The autotune policy of the triton backend: which configs each kernel may run with.

`kernel_configs` is the one source of truth: the autotuner prunes its candidates with
it, and benchmarks/compile_report.py compiles every config it returns for sm_80 and
sm_90 and checks them for spills and shared memory. The names here are public so that
the report reads the same policy the launchers use. Kernel names (`KERNEL_NAMES`) are
those of `launch.py`'s `launch_<name>` functions.

Configs are pruned per dtype, dot precision, dropout and R-block with two estimates, a
register count (`register_estimate` against `REGISTER_BUDGET`) and shared memory
(`smem_estimate` against the target's limit); the budgets were set with the compile
report. What the estimates cannot see is ptxas's occupancy choice, which differs between
Triton versions (a tile far below its budget held to 80 or 128 registers, spilling a few
bytes): on a GPU the launcher then compiles the estimated configs and drops those that
spill (`launch.spill_free`), and the compile report counts a spill as a problem only
where every config of a launch spills.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

# Usable shared memory per block in bytes (the opt-in maximum), from the CUDA C++
# Programming Guide, "Technical Specifications per Compute Capability": 163 KB on
# sm_80 (A100), 227 KB on sm_90 (H100). On a live device the launchers read
# `shared_memory_per_block_optin` from torch instead.
SHARED_MEMORY_LIMIT = {(8, 0): 166912, (9, 0): 232448}
# Shared memory of other GPUs that report no opt-in maximum (99 KB: sm_86, sm_89, sm_120).
DEFAULT_SHARED_MEMORY = 101376
TARGETS = tuple(SHARED_MEMORY_LIMIT)
KERNEL_NAMES = ("shrink", "fwd", "bwd_dy", "bwd_dx", "bwd_da", "bwd_db")

# Up to this rank the dY pass also makes dB's partials: 4R / dy_block_m(...) of dY's
# bytes (half precision) of extra traffic, against a whole second read of dY otherwise.
FUSED_DB_MAX_R = 16

# What the autotuner's cache is keyed on: the problem sizes and what changes the config
# list (Triton adds the dtypes itself).
AUTOTUNE_KEYS = {
    "shrink": ["M", "K", "R", "HAS_DROPOUT", "INPUT_PRECISION"],
    "fwd": ["M", "N", "K", "R", "DROPPED_BASE", "INPUT_PRECISION"],
    "bwd_dy": ["M", "N", "R", "COMPUTE_DM", "INPUT_PRECISION"],
    "bwd_dx": ["M", "N", "K", "R", "HAS_DROPOUT", "DROPPED_BASE", "INPUT_PRECISION"],
    "bwd_da": ["M", "K", "R", "HAS_DROPOUT", "INPUT_PRECISION"],
    "bwd_db": ["M", "N", "R", "INPUT_PRECISION"],
}
# The launch argument whose dtype is the operand dtype that `kernel_configs` takes.
DTYPE_ARG = {"shrink": "x", "fwd": "x", "bwd_dy": "dy", "bwd_dx": "dy", "bwd_da": "x"}
DTYPE_ARG |= {"bwd_db": "dy"}


@dataclasses.dataclass(frozen=True)
class LaunchSizes:
    """Sizes the launchers choose on the host: the R-blocks, the alignment of the
    reductions' splits, the rows of the dY pass and the helper kernels' blocks."""

    r_step_max: int  # BLOCK_R of the R-wide steps of the forward and dX GEMMs
    r_tile_max: int  # BLOCK_R of the kernels with an R-wide accumulator
    r_tile_max_fma: int  # the same on the FMA path (fp32 without TF32)
    n_chunk_align: int  # N-chunks of the dY pass
    m_chunk_align: int  # M-chunks of the dA and dB reductions
    dy_rows: int  # rows of a dY-pass program, BLOCK_R <= 32
    dy_rows_wide_r: int  # BLOCK_R > 32
    dy_rows_fma: int  # on the FMA path
    sum_block_t: int
    sum_block_l: int
    mask_block_m: int
    mask_block_k: int

    def r_step_block(self, R: int) -> int:
        """BLOCK_R of the R-wide accumulator steps of the forward and dX GEMMs."""
        return block_r(R, self.r_step_max)

    def r_tile_block(self, R: int, fma: bool) -> int:
        """BLOCK_R of the kernels with an R-wide accumulator (shrink, dY pass, dA, dB)."""
        return block_r(R, self.r_tile_max_fma if fma else self.r_tile_max)

    def dy_block_m(self, BLOCK_R: int, fma: bool) -> int:
        """Rows per program of the dY pass; fixed by the launcher, since the number of the
        dB / db partials depends on it (tall tiles cut dB's partial traffic, 4R / BLOCK_M)."""
        if fma:
            return self.dy_rows_fma
        return self.dy_rows if BLOCK_R <= 32 else self.dy_rows_wide_r


# On a GPU the R-wide steps of the GEMMs (s U B^T, G A) are one MMA K-step of 16 each;
# the kernels whose accumulator is R wide take R in tiles of 64 (32 on the FMA path,
# whose dot operands live in registers).
GPU_SIZES = LaunchSizes(
    r_step_max=16,
    r_tile_max=64,
    r_tile_max_fma=32,
    n_chunk_align=256,
    m_chunk_align=256,
    dy_rows=128,
    dy_rows_wide_r=64,
    dy_rows_fma=32,
    sum_block_t=8,
    sum_block_l=512,
    mask_block_m=32,
    mask_block_k=128,
)


def block_r(R: int, cap: int) -> int:
    """BLOCK_R for rank R: a power of two in [16, cap] (16 is tl.dot's minimum)."""
    return max(16, min(triton.next_power_of_2(R), cap))


def launch_block_r_values(name: str, fma: bool) -> tuple:
    """Every BLOCK_R a launcher passes to kernel `name` on a GPU (for the compile report)."""
    if name in ("fwd", "bwd_dx"):
        return tuple(sorted({GPU_SIZES.r_step_block(r) for r in (1, 256)}))
    cap = GPU_SIZES.r_tile_max_fma if fma else GPU_SIZES.r_tile_max
    values = tuple(v for v in (16, 32, 64, 128) if v <= cap)
    if name == "bwd_db":  # dB runs on its own only above the fused rank
        values = tuple(v for v in values if v > FUSED_DB_MAX_R)
    return values


def config_key(config: triton.Config) -> tuple:
    """What tells two configs apart: block sizes, warps and stages."""
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


def _config(num_warps, num_stages, maxnreg=None, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


# FMA-path tiles for DoRA's two accumulators only (`kernel_configs`): the tiles above
# spill there, and the plain GEMMs keep their own list.
TWO_ACC_FMA_SHAPES = [(32, 32, 32, 4, 3), (64, 64, 16, 8, 3)]


def _is_two_acc_fma_tile(name: str, config: triton.Config) -> bool:
    out, loop = ("BLOCK_N", "BLOCK_K") if name == "fwd" else ("BLOCK_K", "BLOCK_N")
    blocks = config.kwargs
    shape = (blocks["BLOCK_M"], blocks[out], blocks[loop], config.num_warps, config.num_stages)
    return shape in TWO_ACC_FMA_SHAPES


def _gemm_candidates(name: str, elem: int, fma: bool) -> list[triton.Config]:
    # (BLOCK_M, BLOCK_<out>, BLOCK_<loop>, warps, stages): the matmul tutorial's set, plus
    # 8-warp 128x128 (room for the dropout mask of dX) and a 4-stage 128x256 tile for
    # sm_90's shared memory. float32 halves the loop block; the FMA path keeps small
    # tiles (its operands sit in registers).
    out, loop = ("BLOCK_N", "BLOCK_K") if name == "fwd" else ("BLOCK_K", "BLOCK_N")
    if fma:
        shapes = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)]
        shapes += [(32, 64, 32, 4, 3), *TWO_ACC_FMA_SHAPES]
    else:
        bl = 64 if elem == 2 else 32
        shapes = [
            (128, 256, bl, 8, 3),
            (128, 256, bl, 8, 4),
            (128, 128, bl, 8, 4),
            (128, 128, bl, 4, 4),
            (128, 64, bl, 4, 4),
            (64, 128, bl, 4, 4),
            (64, 64, bl, 4, 3),
        ]
    return [
        _config(w, s, BLOCK_M=bm, **{out: bo, loop: bl}, GROUP_M=8) for bm, bo, bl, w, s in shapes
    ]


def _reduction_candidates(name: str, elem: int, fma: bool) -> list[triton.Config]:
    # (BLOCK of the wide output dim, BLOCK_M of the reduction, warps, stages)
    wide = "BLOCK_K" if name == "bwd_da" else "BLOCK_N"
    bm = 64 if elem == 2 else 32
    shapes = [(64, bm, 4, 4), (128, bm // 2, 4, 4), (256, bm // 2, 8, 3)]
    # dA's 8-warp tile takes half the rows: ptxas spills (128, bm) in some variants
    shapes += [(128, bm // 2 if name == "bwd_da" else bm, 8, 3)]
    if fma:
        shapes = [(64, 32, 4, 4), (128, 32, 8, 3)]
        shapes += [(128, 16, 4, 4)] if name == "bwd_da" else []
    # maxnreg: without a .maxnreg the ptxas of Triton 3.9 (CUDA 13) holds these kernels
    # to 64-128 registers for occupancy and spills a few bytes in some variants; with it
    # ptxas takes what the tile needs (checked by the report).
    return [_config(w, s, 255, **{wide: bo, "BLOCK_M": bm}) for bo, bm, w, s in shapes]


def candidates(name: str, elem: int, fma: bool) -> list[triton.Config]:
    """Configs of kernel `name` for operands of `elem` bytes (on the FMA path: fp32
    without TF32), before the per-launch checks of `kernel_configs`."""
    half = elem == 2
    if name in ("fwd", "bwd_dx"):
        return _gemm_candidates(name, elem, fma)
    if name == "shrink":
        # Memory-bound: modest M-tiles for many programs.
        bk = 128 if half else 64
        shapes = [(64, bk, 4, 3), (128, bk // 2, 8, 3), (64, bk // 2, 4, 3), (32, bk // 2, 4, 4)]
        if fma:
            shapes = [(128, 32, 8, 3), (32, 32, 4, 4), (64, 16, 4, 4)]
        return [_config(w, s, BLOCK_M=bm, BLOCK_K=bk) for bm, bk, w, s in shapes]
    if name == "bwd_dy":
        shapes = [(64, 8, 4), (128, 8, 3), (32, 4, 4)] if half else [(32, 8, 3), (16, 4, 3)]
        if fma:
            shapes = [(32, 4, 3), (16, 4, 4)]
        return [_config(w, s, BLOCK_N=bn) for bn, w, s in shapes]
    if name in ("bwd_da", "bwd_db"):
        return _reduction_candidates(name, elem, fma)
    raise ValueError(f"unknown kernel {name!r}; expected one of {KERNEL_NAMES}")


def register_estimate(name, blocks, num_warps, BLOCK_R, fma, dropout, two_acc=False) -> int:
    """32-bit registers per thread held by a config's large tiles: the fp32 accumulator
    (two of them in DoRA's dropout form, `two_acc`), the dropout mask (the shrink's
    Philox words and bits, the bits dX and dA decode; the two-accumulator GEMMs decode
    theirs outside the loop or per loop tile, and hold none across it), and on the FMA
    path the operands."""
    threads = 32 * num_warps
    if name in ("fwd", "bwd_dx"):
        out = blocks["BLOCK_N"] if name == "fwd" else blocks["BLOCK_K"]
        loop = blocks["BLOCK_K"] if name == "fwd" else blocks["BLOCK_N"]
        acc, mask = blocks["BLOCK_M"] * out, blocks["BLOCK_M"] * out
        operands = (blocks["BLOCK_M"] + out) * loop
    elif name == "shrink":
        acc, mask = blocks["BLOCK_M"] * BLOCK_R, blocks["BLOCK_M"] * blocks["BLOCK_K"]
        operands = (blocks["BLOCK_M"] + BLOCK_R) * blocks["BLOCK_K"]
    elif name == "bwd_dy":
        fused = BLOCK_R <= FUSED_DB_MAX_R
        rows = GPU_SIZES.dy_block_m(BLOCK_R, fma)
        acc = (rows + (blocks["BLOCK_N"] if fused else 0)) * BLOCK_R
        mask, operands = 0, (rows + BLOCK_R) * blocks["BLOCK_N"]
    else:  # bwd_da [R, K] and bwd_db [N, R] accumulators, reduced over BLOCK_M rows
        wide = blocks["BLOCK_K"] if name == "bwd_da" else blocks["BLOCK_N"]
        acc, mask = BLOCK_R * wide, blocks["BLOCK_M"] * wide
        operands = (BLOCK_R + wide) * blocks["BLOCK_M"]
    if two_acc:
        acc, mask = 2 * acc, 0
    regs = acc + (mask if dropout else 0) + (operands if fma else 0)
    return regs // threads


# Register budgets per thread for `register_estimate`, set with the compile report
# (benchmarks/compile_report.py): above them ptxas spills. Kernels that run Philox or
# FMA dots next to their accumulator get less.
REGISTER_BUDGET = {"fwd": 128, "bwd_dx": 128, "shrink": 80, "bwd_dy": 96}
REGISTER_BUDGET |= {"bwd_da": 80, "bwd_db": 128}
TWO_ACC_FMA_BUDGET = 40


def smem_estimate(name, blocks, num_stages, elem, BLOCK_R, fma) -> int:
    """Shared memory of the pipelined operand tiles in bytes (an estimate, for pruning):
    x-dtype tiles take `elem` bytes an element, adapter / U / G tiles up to 4."""
    if name in ("fwd", "bwd_dx"):
        out, loop = ("BLOCK_N", "BLOCK_K") if name == "fwd" else ("BLOCK_K", "BLOCK_N")
        main = (blocks["BLOCK_M"] + blocks[out]) * blocks[loop] * elem
        lora = (blocks["BLOCK_M"] + blocks[out]) * BLOCK_R * 4
        return num_stages * main + lora
    if name == "shrink":
        return num_stages * blocks["BLOCK_K"] * (blocks["BLOCK_M"] * elem + BLOCK_R * 4)
    if name == "bwd_dy":
        rows = GPU_SIZES.dy_block_m(BLOCK_R, fma)
        return num_stages * blocks["BLOCK_N"] * (rows * elem + BLOCK_R * 4)
    wide = blocks["BLOCK_K"] if name == "bwd_da" else blocks["BLOCK_N"]
    return num_stages * blocks["BLOCK_M"] * (BLOCK_R * 4 + wide * elem)


def _register_budget(name, elem, fma, dropout, sm80, num_warps, two_acc=False) -> int:
    budget = REGISTER_BUDGET[name]
    if two_acc:
        dropout = False  # no mask held beside the accumulators (register_estimate)
        if fma:
            # Two accumulators beside FMA operands in registers: ptxas spills from the
            # 32x64 tile (estimated 56; compile report).
            return TWO_ACC_FMA_BUDGET
        if sm80:
            # mma.sync's operand fragments beside two accumulators: the 8-warp 128x128
            # bf16 forward (estimated 128) spills 60 B on sm_80 (compile report).
            return 64
    if name in ("fwd", "bwd_dx") and not fma:
        # dX's mask doubles its tile's registers; sm_80's mma.sync holds operand fragments
        # in registers beside the accumulator, which leaves room for a 128-register
        # accumulator only in the tutorial's 8-warp half-precision forward tile
        # (measured with the compile report).
        narrow = elem == 4 or num_warps == 4 or name == "bwd_dx"
        if dropout or (sm80 and narrow):
            budget = 64
    if name == "shrink" and dropout and sm80 and elem == 4 and not fma:
        # Making and packing the mask's bits beside a TF32 accumulator: ptxas spills the
        # 4-warp 64x64 tile at R-block 64 on sm_80 (24 B; compile report).
        budget = 56
    return budget


def kernel_configs(
    name: str,
    *,
    capability: tuple,
    smem_limit: int,
    dtype: torch.dtype,
    BLOCK_R: int,
    INPUT_PRECISION: str = "ieee",
    HAS_DROPOUT: bool = True,
    DROPPED_BASE: bool = False,
) -> list[triton.Config]:
    """Autotune configs of kernel `name` for one launch: a GPU of `capability` with
    `smem_limit` bytes of shared memory per block, operands of `dtype`, the launcher's
    BLOCK_R, dot precision and dropout flag (and DROPPED_BASE: the forward and dX GEMMs
    of DoRA's dropout form, two accumulators).

    The one source of truth for autotuning (the autotuner prunes its list with this)
    and for the ahead-of-time compile report (benchmarks/compile_report.py), which
    checks every config it returns for spills and shared memory.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    fma = elem == 4 and INPUT_PRECISION == "ieee"
    dropout = HAS_DROPOUT and name in ("shrink", "bwd_dx", "bwd_da")
    sm80 = tuple(capability) < (9, 0)
    two_acc = DROPPED_BASE and name in ("fwd", "bwd_dx")
    configs = []
    for config in candidates(name, elem, fma):
        if fma and name in ("fwd", "bwd_dx") and not two_acc:
            if _is_two_acc_fma_tile(name, config):
                continue
        budget = _register_budget(name, elem, fma, dropout, sm80, config.num_warps, two_acc)
        regs = register_estimate(
            name, config.kwargs, config.num_warps, BLOCK_R, fma, dropout, two_acc
        )
        smem = smem_estimate(name, config.kwargs, config.num_stages, elem, BLOCK_R, fma)
        if regs <= budget and smem <= smem_limit:
            configs.append(config)
    if not configs:
        raise RuntimeError(
            f"no config of {name} fits: {dtype}, {INPUT_PRECISION}, R-block {BLOCK_R}, "
            f"{'two accumulators, ' if two_acc else ''}{smem_limit} B of shared memory"
        )
    return configs


def all_candidates(name: str) -> list[triton.Config]:
    """Every candidate of kernel `name` over operand sizes and dot paths, each once: the
    list a GPU autotuner starts from and prunes with `kernel_configs`."""
    configs = [c for elem in (2, 4) for fma in (False, True) for c in candidates(name, elem, fma)]
    return list({config_key(c): c for c in configs}.values())
