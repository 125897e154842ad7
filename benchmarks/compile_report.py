"""Ahead-of-time compile report for the Triton kernels of the "triton" backend.

Compiles every kernel with every autotune config (`backend_triton.configs.kernel_configs`,
the list the autotuner itself uses) for sm_80 and sm_90, for bfloat16, float16 and float32
(float32 with TF32 and with IEEE dots), and bfloat16 x with float32 adapters, at every
BLOCK_R the launchers can pass, via `triton.compile(ASTSource(...),
target=GPUTarget(...))`. No GPU is needed.

For each compiled kernel it prints registers and spills (spill stores plus spill loads,
from the `ptxas -v` log of Triton's own ptxas run, so with the flags a GPU machine uses;
the `cuobjdump` that ships with Triton reads the cubin if that log is missing),
shared memory (the kernel's dynamic shared memory from the compile metadata) and the
tensor-core instructions in the PTX (`wgmma` on sm_90, `mma.sync` on sm_80).

Shared-memory limits (opt-in maximum per block, CUDA C++ Programming Guide, "Technical
Specifications per Compute Capability"): 166912 B (163 KB) on sm_80 (A100), 232448 B
(227 KB) on sm_90 (H100).

The 4-bit dequantize (`backend_triton/dequant.py`, blocksize 64, without and with double
quantization) is compiled as its launcher runs it; a fused multiply-add in its PTX
would break bit-exactness with bitsandbytes and is reported as a problem.

Exits with status 1 if any configuration fails to compile or needs more shared memory
than its target has, if the dequantize contracts a multiply-add, or if every
configuration of a launch spills. A configuration that spills where another of its
launch does not is listed as "dropped at launch": on a GPU the launcher compiles the
candidates and drops those (`backend_triton.launch.spill_free`), since whether ptxas
spills a tile depends on the Triton version's occupancy heuristics.

    python benchmarks/compile_report.py              # everything (several minutes)
    python benchmarks/compile_report.py --quick      # per kernel and target: the first
                                                     # config that compiles cleanly
    python benchmarks/compile_report.py --csv out.csv
"""

from __future__ import annotations

import os

# The report compiles for GPUs: the kernels must be real JIT functions, so the
# interpreter is switched off before Triton (or lora_kernels) is imported.
os.environ.pop("TRITON_INTERPRET", None)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_kernels.backend_triton import configs, dequant, kernels  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
TARGET_NAMES = {(8, 0): "sm_80", (9, 0): "sm_90"}


@dataclass(frozen=True)
class DtypeCase:
    """Operand dtypes of one compile: x (and W, dY), the adapters, and dot precision."""

    label: str
    x: torch.dtype
    lora: torch.dtype
    precision: str


DTYPE_CASES = (
    DtypeCase("bf16", torch.bfloat16, torch.bfloat16, "ieee"),
    DtypeCase("fp16", torch.float16, torch.float16, "ieee"),
    DtypeCase("fp32-tf32", torch.float32, torch.float32, "tf32"),
    DtypeCase("fp32-ieee", torch.float32, torch.float32, "ieee"),
    DtypeCase("bf16+fp32-adapters", torch.bfloat16, torch.float32, "ieee"),
)
# Kernels whose code depends on the adapters' dtype (they load lora_A or lora_B).
_LOADS_ADAPTERS = {"shrink", "fwd", "bwd_dy", "bwd_dx"}

_TRITON_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class KernelSpec:
    """How a launcher calls one kernel: pointer dtypes, unit strides, fixed constexprs."""

    fn: object
    pointers: dict  # argument -> "x" | "lora" | "fp32" | "i64" | "i8" | "u8" | None (absent)
    unit_strides: set  # strides that are 1 for contiguous operands (specialised by Triton)
    constexprs: dict = field(default_factory=dict)


def kernel_specs(block_r: int, fma: bool, dropout: bool, rank_tf32: bool) -> dict:
    """The kernels as the launchers call them for contiguous operands, with the sizes
    the launchers choose on a GPU (`configs.GPU_SIZES`)."""
    sizes = configs.GPU_SIZES
    bits = "u8" if dropout else None  # without dropout the launchers pass keep_bits=None
    return {
        "shrink": KernelSpec(
            kernels.lora_shrink_kernel,
            {"x": "x", "a": "lora", "u": "fp32", "keep_bits": bits, "seed": "i64"},
            {"s_xk", "s_ak", "s_ur", "s_kb"},
            {"HAS_DROPOUT": dropout, "BLOCK_R": block_r},
        ),
        "fwd": KernelSpec(
            kernels.lora_fwd_kernel,
            {"x": "x", "w": "x", "bias": "x", "u": "fp32", "b": "lora", "y": "x"}
            | {"scaling": "fp32"}
            | dict.fromkeys(("row_scale", "base_scale", "keep_bits", "dropped")),
            {"s_xk", "s_wk", "s_ur", "s_br", "s_yn"},
            {"HAS_BIAS": True, "RANK_TF32": rank_tf32, "BLOCK_R": block_r}
            | {"ROW_SCALE": False, "DROPPED_BASE": False},
        ),
        "bwd_dy": KernelSpec(
            kernels.lora_bwd_dy_kernel,
            {"dy": "x", "b": "lora", "u": "fp32", "g_part": "fp32", "db_part": "fp32"}
            | {"dbias_part": "fp32", "ds_part": "fp32"}
            | dict.fromkeys(("row_scale", "kept", "dm_part")),
            {"s_dyn", "s_br", "s_ur"},
            {
                "ROW_SCALE": False,
                "COMPUTE_DM": False,
                "NEED_G": True,
                # The launchers fuse dB into this pass for R <= 16, i.e. BLOCK_R == 16.
                "COMPUTE_DB": block_r <= configs.FUSED_DB_MAX_R,
                "COMPUTE_DS": True,
                "COMPUTE_DBIAS": True,
                "RANK_TF32": rank_tf32,
                "BLOCK_M": sizes.dy_block_m(block_r, fma),
                "BLOCK_R": block_r,
            },
        ),
        "bwd_dx": KernelSpec(
            kernels.lora_bwd_dx_kernel,
            {"dy": "x", "w": "x", "g": "fp32", "a": "lora", "dx": "x", "scaling": "fp32"}
            | {"keep_bits": bits, "row_scale": None},
            {"s_dyn", "s_wk", "s_gr", "s_ak", "s_dxk", "s_kb"},
            {"HAS_DROPOUT": dropout, "RANK_TF32": rank_tf32, "BLOCK_R": block_r}
            | {"ROW_SCALE": False, "DROPPED_BASE": False},
        ),
        "bwd_da": KernelSpec(
            kernels.lora_bwd_da_kernel,
            {"g": "fp32", "x": "x", "da_part": "fp32", "keep_bits": bits},
            {"s_gr", "s_xk", "s_kb"},
            {"HAS_DROPOUT": dropout, "BLOCK_R": block_r, "RANK_TF32": rank_tf32},
        ),
        "bwd_db": KernelSpec(
            kernels.lora_bwd_db_kernel,
            {"dy": "x", "u": "fp32", "db_part": "fp32"},
            {"s_dyn", "s_ur"},
            {"BLOCK_R": block_r, "RANK_TF32": rank_tf32},
        ),
        "sum_partials": KernelSpec(
            kernels.sum_partials_kernel,
            {"part": "fp32", "out": "x", "scaling": "fp32"},
            set(),
            {"HAS_SCALING": True, "BLOCK_T": sizes.sum_block_t, "BLOCK_L": sizes.sum_block_l},
        ),
        "dropout_mask": KernelSpec(
            kernels.dropout_mask_kernel,
            {"keep": "i8", "seed": "i64"},
            {"s_kk"},
            {"PACK_BITS": False, "BLOCK_M": sizes.mask_block_m, "BLOCK_K": sizes.mask_block_k},
        ),
        # The same kernel writing packed bits: what backward runs when given no bits.
        "dropout_bits": KernelSpec(
            kernels.dropout_mask_kernel,
            {"keep": "u8", "seed": "i64"},
            {"s_kk"},
            {"PACK_BITS": True, "BLOCK_M": sizes.mask_block_m, "BLOCK_K": sizes.mask_block_k},
        ),
        # The 4-bit dequantize at bitsandbytes' default blocksize, without and with
        # double quantization (absmax as uint8 codes, decoded in the kernel).
        "dequant4": _dequant_spec(nested=False),
        "dequant4_dq": _dequant_spec(nested=True),
    }


# DoRA's variants of three kernels (lora_kernels.dora_op on the triton backend): the
# base kernel, its dropout flag, and what the variant sets (pointers, constexprs).
DORA_VARIANTS = {
    "fwd_dora": ("fwd", False, {"row_scale": "fp32"}, {"ROW_SCALE": True}),
    "fwd_dora_p": (
        "fwd",
        True,
        {"row_scale": "fp32", "base_scale": "fp32", "keep_bits": "u8", "dropped": "x"},
        {"DROPPED_BASE": True},
    ),
    "bwd_dy_dora": (
        "bwd_dy",
        False,
        {"row_scale": "fp32", "kept": "x", "dm_part": "fp32"},
        {"ROW_SCALE": True, "COMPUTE_DM": True},
    ),
    "bwd_dx_dora": ("bwd_dx", False, {"row_scale": "fp32"}, {"ROW_SCALE": True}),
    "bwd_dx_dora_p": ("bwd_dx", True, {"row_scale": "fp32"}, {"DROPPED_BASE": True}),
}


def dora_spec(name: str, block_r: int, fma: bool, rank_tf32: bool) -> KernelSpec:
    base, dropout, pointers, constexprs = DORA_VARIANTS[name]
    spec = kernel_specs(block_r, fma, dropout, rank_tf32)[base]
    unit = {"s_kb", "s_pn"} if "dropped" in pointers else set()
    return KernelSpec(
        spec.fn, spec.pointers | pointers, spec.unit_strides | unit, spec.constexprs | constexprs
    )


def _dequant_spec(nested: bool) -> KernelSpec:
    blocksize = 64
    absent = None if not nested else "fp32"
    return KernelSpec(
        dequant.dequant_4bit_kernel,
        {"packed": "u8", "absmax": "u8" if nested else "fp32", "code": "fp32", "out": "x"}
        | {"absmax_code": absent, "absmax2": absent, "offset": absent},
        set(),
        {
            "NESTED": nested,
            "BLOCKSIZE": blocksize,
            "BLOCKSIZE2": 256,
            "GROUP": max(1, dequant.ELEMENTS_PER_PROGRAM // blocksize),
        },
    )


# The 4-bit dequantize: bit-exact with bitsandbytes only without fused multiply-adds,
# so an fma in its PTX (compiled with Triton's default fp fusion) is a problem.
_DEQUANT = ("dequant4", "dequant4_dq")
_HELPERS = ("sum_partials", "dropout_mask", "dropout_bits", *_DEQUANT)
# Helpers without a floating-point operand: compiled for one dtype case.
_NO_FLOAT = ("dropout_mask", "dropout_bits")
# Kernels compiled with and without dropout (their configs differ: the mask's registers).
_DROPOUT_KERNELS = ("shrink", "bwd_dx", "bwd_da")


def configs_for(name, target, case, block_r, dropout) -> list:
    if name in _HELPERS:
        num_warps = dequant.NUM_WARPS if name in _DEQUANT else 4
        return [triton.Config({}, num_warps=num_warps, num_stages=1)]
    dropped_base = False
    if name in DORA_VARIANTS:
        dropped_base = DORA_VARIANTS[name][3].get("DROPPED_BASE", False)
        name = DORA_VARIANTS[name][0]
    return configs.kernel_configs(
        name,
        capability=target,
        smem_limit=configs.SHARED_MEMORY_LIMIT[target],
        dtype=case.x,
        BLOCK_R=block_r,
        INPUT_PRECISION=case.precision,
        HAS_DROPOUT=dropout,
        DROPPED_BASE=dropped_base,
    )


@dataclass
class Row:
    kernel: str
    dtypes: str
    dropout: str
    block_r: int
    config: str
    target: str
    regs: int = -1
    spill_bytes: int = -1
    shared: int = -1
    mma: str = ""
    seconds: float = 0.0
    problem: str = ""
    status: str = ""  # what the row means when it is not a problem ("ok" when empty)


# compile_one's mark for a spill; compile_launch decides whether it is a problem.
_SPILLS = "spills"
_DROPPED = "dropped at launch"


def _signature(spec: KernelSpec, case: DtypeCase, config: triton.Config):
    fn = spec.fn
    constexprs = {**spec.constexprs, **config.kwargs}
    if "INPUT_PRECISION" in fn.arg_names:
        constexprs["INPUT_PRECISION"] = case.precision
    pointer_types = {
        "x": "*" + _TRITON_DTYPE[case.x],
        "lora": "*" + _TRITON_DTYPE[case.lora],
        "fp32": "*fp32",
        "i64": "*i64",
        "i8": "*i8",
        "u8": "*u8",
    }
    signature, attrs = {}, {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
            if name not in constexprs:
                raise KeyError(f"{fn.__name__}: no value for constexpr {name}")
        elif name in spec.pointers and spec.pointers[name] is None:
            signature[name] = "constexpr"
            constexprs[name] = None
        elif name in spec.pointers:
            signature[name] = pointer_types[spec.pointers[name]]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in spec.unit_strides:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in ("dropout_scale", "scale"):
            signature[name] = "fp32"
        elif name == "threshold":
            signature[name] = "i32"  # do_not_specialize: never an alignment hint
        else:
            # Sizes and strides: i32, divisible by 16 as for 4096-wide layers.
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, {k: v for k, v in constexprs.items() if k in fn.arg_names}, attrs


def _resource_usage(ptxas_log: str, cubin: bytes) -> tuple[int, int]:
    """(registers, spill bytes = spill stores + spill loads) of the compiled kernel.

    From the `ptxas -v` log of Triton's own ptxas run (same flags as on a GPU machine);
    cuobjdump's resource usage of the cubin if the log is missing.
    """
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    if regs and spills:
        return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", out))
    if "REG" not in fields:
        raise RuntimeError(f"neither ptxas nor cuobjdump reported resource usage:\n{out}")
    return int(fields["REG"]), int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0))


def _mma(ptx: str) -> str:
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "-"


def compile_one(name, spec, case, config, target, block_r, dropout, shared_limit=None) -> Row:
    row = Row(
        kernel=name,
        dtypes=case.label,
        dropout=("p>0" if dropout else "p=0") if name in _DROPOUT_KERNELS else "",
        block_r=block_r,
        config=" ".join(f"{k}={v}" for k, v in config.kwargs.items())
        + f" w{config.num_warps} s{config.num_stages}"
        + (f" r{config.maxnreg}" if config.maxnreg else ""),
        target=TARGET_NAMES[target],
    )
    start = time.perf_counter()
    try:
        signature, constexprs, attrs = _signature(spec, case, config)
        source = ASTSource(fn=spec.fn, signature=signature, constexprs=constexprs, attrs=attrs)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints the ptxas -v log
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", target[0] * 10 + target[1], 32),
                options={
                    "num_warps": config.num_warps,
                    "num_stages": config.num_stages,
                    **({"maxnreg": config.maxnreg} if config.maxnreg else {}),
                },
            )
        row.regs, row.spill_bytes = _resource_usage(log.getvalue(), compiled.asm["cubin"])
        row.shared = int(compiled.metadata.shared)
        row.mma = _mma(compiled.asm["ptx"])
        limit = shared_limit or configs.SHARED_MEMORY_LIMIT[target]
        problems = []
        if row.shared > limit:
            problems.append(f"shared {row.shared} B > {limit} B")
        if name in _DEQUANT and re.search(r"\bfma\.", compiled.asm["ptx"]):
            problems.append("fused multiply-add in the PTX")
        if problems:
            row.problem = "; ".join(problems)
        elif row.spill_bytes > 0:
            row.problem = _SPILLS
    except Exception as error:  # a failed compile is a row of the report, not a crash
        row.problem = f"compile error: {type(error).__name__}: {str(error).splitlines()[0]}"
    row.seconds = time.perf_counter() - start
    return row


def plan(only: tuple | None, quick: bool):
    """(name, spec, dtype case, target, block_r, dropout, configs) for every launch."""
    names = only or (*configs.KERNEL_NAMES, *DORA_VARIANTS, *_HELPERS)
    cases = (DTYPE_CASES[0],) if quick else DTYPE_CASES
    for target in configs.TARGETS:
        for name in names:
            for case in cases:
                if case.x != case.lora and name not in _LOADS_ADAPTERS:
                    continue
                if name in _NO_FLOAT and case is not cases[0]:
                    continue
                if name in _DEQUANT and case.precision == "tf32":  # it has no dot
                    continue
                fma = case.x == torch.float32 and case.precision == "ieee"
                base = DORA_VARIANTS[name][0] if name in DORA_VARIANTS else name
                values = (0,) if name in _HELPERS else configs.launch_block_r_values(base, fma)
                flags = (True, False) if name in _DROPOUT_KERNELS and not quick else (True,)
                if name in DORA_VARIANTS:
                    flags = (DORA_VARIANTS[name][1],)
                for block_r in values[-1:] if quick else values:
                    for dropout in flags:
                        rank_tf32 = case.x != torch.float32
                        if name in DORA_VARIANTS:
                            spec = dora_spec(name, block_r, fma, rank_tf32)
                        else:
                            spec = kernel_specs(block_r, fma, dropout, rank_tf32)[name]
                        listed = configs_for(name, target, case, block_r, dropout)
                        yield name, spec, case, target, block_r, dropout, listed


def compile_launch(launch, quick: bool, shared_limit=None) -> list[Row]:
    """The rows of one launch: every config, or with `quick` configs in order up to the
    first that compiles cleanly.

    A config that spills is what the launcher on a GPU compiles and drops
    (`launch.spill_free`): its row says so and is a problem only when every config of
    the launch spills (the launcher then keeps them all).
    """
    name, spec, case, target, block_r, dropout, listed = launch
    rows = []
    for config in listed:
        rows.append(compile_one(name, spec, case, config, target, block_r, dropout, shared_limit))
        if quick and not rows[-1].problem:
            break
    spilled = [r for r in rows if r.problem == _SPILLS]
    every_config_spills = len(spilled) == len(listed)
    for r in spilled:
        if every_config_spills:
            r.problem = f"spills {r.spill_bytes} B (no config of this launch is spill-free)"
        else:
            r.problem, r.status = "", f"spills {r.spill_bytes} B: {_DROPPED}"
    return rows


_HEADER = ("kernel", "dtypes", "drop", "R-blk", "config", "target", "regs", "spill")
_HEADER += ("shared", "mma")
_WIDTHS = (13, 18, 4, 5, 53, 6, 4, 5, 7, 5)


def print_header() -> None:
    print("  ".join(h.ljust(w) for h, w in zip(_HEADER, _WIDTHS, strict=True)) + "  status")


def print_row(r: Row) -> None:
    cells = (r.kernel, r.dtypes, r.dropout or "-", r.block_r or "-", r.config, r.target)
    cells += (r.regs,)
    cells += (r.spill_bytes, r.shared, r.mma)
    line = "  ".join(str(c).ljust(w) for c, w in zip(cells, _WIDTHS, strict=True))
    print(line + "  " + (r.problem or r.status or "ok"), flush=True)


def print_summary(rows: list[Row]) -> None:
    """Per kernel and target: worst registers, spills and shared memory over the configs a
    launcher can run (those dropped at launch counted apart), tensor-core use."""
    print("\nsummary (worst case over dtypes, R-blocks and the configs a launcher runs):")
    print("kernel         target  configs  dropped  max regs  spills  max shared  mma")
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.kernel, r.target), []).append(r)
    for (kernel, target), group in groups.items():
        dropped = [r for r in group if r.status.endswith(_DROPPED)]
        ok = [r for r in group if r.regs >= 0 and r not in dropped]
        regs = max((r.regs for r in ok), default=-1)
        spills = max((r.spill_bytes for r in ok), default=-1)
        shared = max((r.shared for r in ok), default=-1)
        mma = "/".join(sorted({r.mma for r in ok}))
        print(
            f"{kernel:<14} {target:<7} {len(group):>7}  {len(dropped):>7}  {regs:>8}  "
            f"{spills:>6}  {shared:>10}  {mma}"
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="bf16, largest R-block, 1 config")
    parser.add_argument("--kernels", nargs="*", help="only these kernels")
    parser.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    parser.add_argument(
        "--shared-limit",
        type=int,
        help="check shared memory against this many bytes instead of the target's limit",
    )
    args = parser.parse_args(argv)
    if not CUOBJDUMP.exists():
        print(f"cuobjdump not found at {CUOBJDUMP}", file=sys.stderr)
        return 1
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    # Compile every time (no cache hits) and let Triton print ptxas's -v log.
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True

    rows = []
    start = time.perf_counter()
    print_header()
    for launch in plan(args.kernels, args.quick):
        for row in compile_launch(launch, args.quick, args.shared_limit):
            rows.append(row)
            print_row(row)
    print_summary(rows)
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(Row.__dataclass_fields__)
            for r in rows:
                writer.writerow(getattr(r, k) for k in Row.__dataclass_fields__)
    failed = [r for r in rows if r.problem]
    elapsed = time.perf_counter() - start
    dropped = sum(r.status.endswith(_DROPPED) for r in rows)
    print(
        f"\n{len(rows)} compiles in {elapsed:.0f} s; {len(failed)} with problems; "
        f"{dropped} spilling configs dropped at launch"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
