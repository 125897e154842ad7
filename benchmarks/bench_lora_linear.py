#!/usr/bin/env python
"""Kernel benchmark of the LoRA linear layer: Y = X W^T + b + s * (dropout(X) A^T) B^T.

Providers, measured side by side in one run on the same inputs:

- ``linear``: a frozen ``nn.Linear`` (the floor: what the layer costs without LoRA);
- ``peft``: peft's ``lora.Linear``, built by ``peft.get_peft_model`` on a one-layer
  model as users run it (adapters float32 by default, as peft creates them);
- ``unsloth``: the Unsloth-style composition ``out.addmm_(X @ A^T, B^T, alpha=s)``
  (no dropout on that path, so p = 0 only);
- ``lk-<backend>``: ``lora_kernels.lora_linear`` with every backend usable here.

Modes fwd, bwd and fwd+bwd (X requires grad, as inside a network; W frozen; A and B
train). On a GPU each time is ``triton.testing.do_bench`` (median, p20, p80); on a
CPU the providers and modes are interleaved in shuffled order, rep after rep, and
each time is the median (p20, p80) of the wall-clock runs. Inputs rotate among
several sets when one set would fit in the cache. Random inputs throughout (B is not
zero). Ratios to the floor and to peft come from the same run.

Memory: the activation bytes each provider saves for backward (saved_tensors_hooks,
parameters excluded), and the peak memory of one fwd+bwd on a GPU.

The model columns come from benchmarks/traffic_model.py: bytes and FLOPs of each
provider's design and a roofline time on an H100 from datasheet values. They are a
model, not a measurement, and are labelled so everywhere.

Output: a Markdown table on stdout, rows upserted into benchmarks/results/<device>.csv,
PNG plots drawn from that CSV (benchmarks/plot.py), a progress bar on stderr.

    python benchmarks/bench_lora_linear.py            # the default set (< 5 min on 2 cores)
    python benchmarks/bench_lora_linear.py --full     # the sweep
    python benchmarks/bench_lora_linear.py --smoke    # a tiny set, seconds (tests)
    python benchmarks/bench_lora_linear.py --model-only --device-kind cuda  # model only
    python benchmarks/bench_lora_linear.py --quick [--cpu-time --threads 1 --iters 31]

`--quick` is the short CPU comparison of the `cpu` backend (benchmarks/cpu_quick.py).
`--qlora` times the 4-bit rows instead (`run_qlora`): a frozen bitsandbytes Linear4bit,
peft's lora.bnb.Linear4bit and LoRALinear on the same nf4 base, plain and with DoRA
(QDoRA: `peft-bnb-dora`, `lk-dora-<backend>`), with saved and
workspace bytes (Markdown only).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # harness, providers, traffic_model and plot live here
    sys.path.insert(0, str(HERE))
try:
    import lora_kernels  # noqa: F401
except ImportError:  # a checkout run without `pip install -e .` or PYTHONPATH
    sys.path.insert(0, str(HERE.parent))

import harness  # noqa: E402
import traffic_model  # noqa: E402
from harness import DTYPE_NAMES, DTYPES, RESULTS  # noqa: E402
from providers import (  # noqa: E402
    Task,
    check_output,
    is_dora,
    make_input_set,
    peak_bytes_gpu,
    provider_backend,
    saved_bytes,
    usable_backends,
)

MODES = ("fwd", "bwd", "fwd+bwd")


# (K, N) = (in_features, out_features) of real projections.
LAYERS = {
    "8b-q/o": (4096, 4096),
    "8b-k/v": (4096, 1024),
    "8b-gate/up": (4096, 14336),
    "8b-down": (14336, 4096),
    "70b-q/o": (8192, 8192),
    "1k": (1024, 1024),  # the README's CPU figure
    "tiny": (48, 40),
}
LAYER_NOTES = {
    "8b-q/o": "Llama-3-8B q_proj/o_proj",
    "8b-k/v": "Llama-3-8B k_proj/v_proj",
    "8b-gate/up": "Llama-3-8B gate_proj/up_proj",
    "8b-down": "Llama-3-8B down_proj",
    "70b-q/o": "Llama-3-70B q_proj/o_proj",
    "1k": "K=N=1024 (the README's CPU figure)",
    "tiny": "smoke test",
}
PROVIDER_LABELS = {
    "linear": "nn.Linear, frozen (floor)",
    "peft": "peft lora.Linear",
    "unsloth": "Unsloth-style addmm_",
    "lk-torch": "lora_kernels [torch]",
    "lk-cpu": "lora_kernels [cpu]",
    "lk-cuda": "lora_kernels [cuda]",
    "lk-triton": "lora_kernels [triton]",
    "peft-dora": "peft lora.Linear, use_dora=True",
    "lk-dora-torch": "lora_kernels DoRA [torch]",
    "lk-dora-cpu": "lora_kernels DoRA [cpu]",
    "lk-dora-cuda": "lora_kernels DoRA [cuda]",
    "lk-dora-triton": "lora_kernels DoRA [triton]",
}
CSV_KEY = (
    "device",
    "threads",
    "layer",
    "M",
    "K",
    "N",
    "R",
    "p",
    "dtype",
    "adapter_dtype",
    "bias",
    "provider",
    "mode",
)
CSV_COLUMNS = (
    "date",
    *CSV_KEY,
    "backend",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "reps",
    "vs_floor",
    "vs_peft",
    "x_bytes",
    "saved_bytes",
    "saved_vs_x",
    "peak_bytes",
    "check",
    "model_flops",
    "model_bytes",
    "model_h100_ms",
    "model_h100_vs_floor",
    "timer",
    "torch",
    "triton",
    "peft",
    "commit",
)


@dataclass(frozen=True)
class Config:
    """One benchmarked shape: x [M, K], W [N, K], rank R, dropout p, dtype of x and W."""

    layer: str
    M: int
    R: int
    p: float
    dtype: torch.dtype

    @property
    def K(self) -> int:
        return LAYERS[self.layer][0]

    @property
    def N(self) -> int:
        return LAYERS[self.layer][1]

    def title(self) -> str:
        return (
            f"M={self.M} K={self.K} N={self.N} R={self.R} p={self.p:g} "
            f"{DTYPE_NAMES[self.dtype]} ({LAYER_NOTES[self.layer]})"
        )


def default_configs(device_type: str) -> list[Config]:
    """The `make bench` set: the README's headline figures plus real projections."""
    if device_type == "cuda":
        bf16 = torch.bfloat16
        return [
            Config("8b-q/o", 8192, 16, 0.1, bf16),  # the headline GPU figure
            Config("8b-q/o", 8192, 16, 0.0, bf16),
            Config("8b-gate/up", 8192, 16, 0.1, bf16),
            Config("8b-down", 8192, 16, 0.1, bf16),
            Config("70b-q/o", 4096, 16, 0.1, bf16),
            Config("8b-q/o", 8192, 16, 0.1, torch.float16),
        ]
    f32 = torch.float32
    return [
        Config("1k", 4096, 16, 0.1, f32),  # the headline CPU figures
        Config("1k", 4096, 16, 0.0, f32),
        Config("8b-q/o", 1024, 16, 0.1, f32),
        Config("1k", 2048, 16, 0.1, torch.bfloat16),
    ]


def full_configs(device_type: str) -> list[Config]:
    """The sweep: real projections x tokens 1k-16k x R {8, 16, 64} x p {0, 0.1} x dtypes."""
    dtypes = (torch.bfloat16, torch.float16) if device_type == "cuda" else (torch.float32,)
    layers = ("8b-q/o", "8b-k/v", "8b-gate/up", "8b-down", "70b-q/o")
    configs = [
        Config(layer, M, R, p, dtype)
        for dtype, layer, M, R, p in itertools.product(
            dtypes, layers, (1024, 4096, 16384), (8, 16, 64), (0.0, 0.1)
        )
    ]
    if device_type != "cuda":
        # bf16 GEMMs are slow on CPUs without AMX/avx512_bf16: a lighter bf16 sweep.
        configs += [
            Config(layer, 1024, R, p, torch.bfloat16)
            for layer, R, p in itertools.product(layers, (8, 16, 64), (0.0, 0.1))
        ]
    return configs


def smoke_configs() -> list[Config]:
    return [Config("tiny", 64, 4, 0.0, torch.float32), Config("tiny", 64, 4, 0.1, torch.float32)]


# ---------------------------------------------------------------------------------------
# One configuration


def n_rotation_sets(cfg: Config, device: torch.device) -> int:
    """Enough input sets that one rotation exceeds twice the cache (at most 4)."""
    e = torch.empty((), dtype=cfg.dtype).element_size()
    per_set = e * (2 * cfg.M * cfg.K + cfg.N * cfg.K + 2 * cfg.M * cfg.N)
    return max(1, min(4, math.ceil(2 * harness.cache_bytes(device) / per_set)))


def time_do_bench_gpu(tasks, n_sets):
    """triton.testing.do_bench per task (median, p20, p80), rotating the input sets."""
    from triton.testing import do_bench

    out = {}
    for task in tasks:
        counter = itertools.count()
        grads = [t for s in task.sets for t in s.grads_to_none()]

        def fn(task=task, counter=counter):
            task.run(next(counter) % n_sets)

        median, p20, p80 = do_bench(
            fn, warmup=25, rep=100, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8]
        )
        out[task.key] = (median, p20, p80)
    return out


def cpu_timing(args) -> dict:
    """The CPU loop's stop rule and clock from the arguments (`--iters` fixes the count)."""
    if args.iters:
        rule = dict(min_reps=args.iters, max_reps=args.iters, min_time=0.0)
    else:
        rule = dict(min_reps=args.reps, max_reps=args.max_reps, min_time=args.min_time)
    return {**rule, "clock": time.thread_time if args.cpu_time else time.perf_counter}


def time_tasks(tasks, n_sets, device, args, progress=None) -> tuple[dict, dict]:
    """{key: (median, p20, p80) in ms} and {key: number of runs, or "do_bench"}."""
    if device.type == "cuda":
        stats = time_do_bench_gpu(tasks, n_sets)
        return stats, {key: "do_bench" for key in stats}

    def on_rep(rep):
        if progress is not None:
            progress.set_postfix_str(f"rep {rep}")

    samples = harness.time_interleaved(
        tasks, n_sets=n_sets, warmup=2, on_rep=on_rep, **cpu_timing(args)
    )
    stats = {key: harness.summarize(vals, 1e3) for key, vals in samples.items()}
    return stats, {key: len(vals) for key, vals in samples.items()}


def run_config(cfg, device, providers, modes, args, env, progress=None) -> list[dict]:
    """Measure one shape: every provider and mode timed interleaved, plus memory and check."""
    adapter_dtype = cfg.dtype if args.adapter_dtype == "same" else torch.float32
    providers = [p for p in providers if not (p == "unsloth" and cfg.p > 0)]
    n_sets = n_rotation_sets(cfg, device)
    sets = [
        make_input_set(cfg, device, adapter_dtype, args.bias, providers, seed=1000 + i)
        for i in range(n_sets)
    ]
    x_bytes = sets[0].x.numel() * sets[0].x.element_size()
    checks = {name: check_output(sets[0], name, cfg) for name in providers}
    saved = {name: saved_bytes(sets[0], name) for name in providers}
    peaks = {}
    if device.type == "cuda":
        peaks = {name: peak_bytes_gpu(sets[0], name) for name in providers}

    tasks = [Task(name, mode, sets) for name in providers for mode in modes]
    for task in tasks:
        task.prepare()
    stats, reps = time_tasks(tasks, n_sets, device, args, progress)
    del tasks, sets
    gc.collect()

    if device.type == "cuda":
        timer = "do_bench"
    else:
        timer = "thread CPU, interleaved" if args.cpu_time else "wall-clock, interleaved"
    rows = []
    for name in providers:
        for mode in modes:
            median, p20, p80 = stats[(name, mode)]
            floor = stats.get(("linear", mode), (math.nan,))[0]
            # DoRA rows compare with peft's DoRA layer, LoRA rows with its LoRA layer.
            peft_name = "peft-dora" if is_dora(name) else "peft"
            peft = stats.get((peft_name, mode), (math.nan,))[0]
            shape = (cfg.M, cfg.K, cfg.N, cfg.R, cfg.p, cfg.dtype, adapter_dtype, args.bias)
            m = traffic_model.model(name, mode, *shape)
            m_floor = traffic_model.model("linear", mode, *shape)
            rows.append(
                {
                    **{k: env[k] for k in ("date", "device", "threads", "commit")},
                    **{k: env[k] for k in ("torch", "triton", "peft")},
                    "layer": cfg.layer,
                    "M": cfg.M,
                    "K": cfg.K,
                    "N": cfg.N,
                    "R": cfg.R,
                    "p": cfg.p,
                    "dtype": DTYPE_NAMES[cfg.dtype],
                    "adapter_dtype": DTYPE_NAMES[adapter_dtype],
                    "bias": int(args.bias),
                    "provider": name,
                    "mode": mode,
                    "backend": provider_backend(name),
                    "median_ms": median,
                    "p20_ms": p20,
                    "p80_ms": p80,
                    "reps": reps[(name, mode)],
                    "vs_floor": median / floor,
                    "vs_peft": median / peft,
                    "x_bytes": x_bytes,
                    "saved_bytes": saved[name],
                    "saved_vs_x": saved[name] / x_bytes,
                    "peak_bytes": peaks.get(name, ""),
                    "check": checks[name],
                    "model_flops": m.get("flops", ""),
                    "model_bytes": m.get("bytes", ""),
                    "model_h100_ms": 1e3 * m["h100_s"] if m else "",
                    "model_h100_vs_floor": m["h100_s"] / m_floor["h100_s"] if m else "",
                    "timer": timer,
                }
            )
    return rows


# ---------------------------------------------------------------------------------------
# Output: Markdown table


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _fmt_ratio(v) -> str:
    return "-" if v == "" or v is None or not math.isfinite(float(v)) else f"{float(v):.2f}x"


def markdown_table(rows: list[dict], modes) -> str:
    """One row per provider: each mode's median (and ratio to the floor), then fwd+bwd
    ratios, spread, saved bytes and the model's prediction."""
    main = "fwd+bwd" if "fwd+bwd" in modes else modes[-1]
    by = {(r["provider"], r["mode"]): r for r in rows}
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    head = ["provider"] + [f"{m} ms (vs floor)" for m in modes]
    head += [
        f"{main} p20-p80 ms, runs",
        f"{main} vs peft",
        "saved for bwd / bytes(X)",
        "check (p=0)",
        f"MODEL: {main} MiB moved",
        f"MODEL: H100 {main} ms (vs floor)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in providers:
        cells = [PROVIDER_LABELS.get(name, name)]
        for mode in modes:
            r = by[(name, mode)]
            cells.append(f"{_fmt_ms(r['median_ms'])} ({_fmt_ratio(r['vs_floor'])})")
        r = by[(name, main)]
        runs = f", {r['reps']} runs" if isinstance(r["reps"], int) else ""
        cells.append(f"{_fmt_ms(r['p20_ms'])}-{_fmt_ms(r['p80_ms'])}{runs}")
        cells.append(_fmt_ratio(r["vs_peft"]))
        cells.append(f"{r['saved_vs_x']:.2f}")
        cells.append(r["check"])
        if r["model_bytes"] != "":
            mib = r["model_bytes"] / 2**20
            cells.append(f"{mib:.0f}" if mib >= 10 else f"{mib:.2g}")
            cells.append(f"{r['model_h100_ms']:.3f} ({_fmt_ratio(r['model_h100_vs_floor'])})")
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Model only: the traffic model's table for a set of shapes, no timing


def model_table(configs, providers, adapter_dtype_arg, bias, modes=("fwd+bwd",)) -> str:
    lines = [
        "MODEL ONLY (benchmarks/traffic_model.py): bytes and FLOPs by design, roofline time "
        "from H100 SXM datasheet values. Not a measurement.",
        "",
    ]
    for cfg in configs:
        adapter_dtype = cfg.dtype if adapter_dtype_arg == "same" else torch.float32
        lines += [f"### {cfg.title()}", ""]
        lines.append(
            "| provider | mode | MODEL GFLOP | MODEL MiB moved | MODEL H100 ms | vs floor |"
        )
        lines.append("|---|---|---|---|---|---|")
        for mode in modes:
            floor = traffic_model.model(
                "linear", mode, cfg.M, cfg.K, cfg.N, cfg.R, cfg.p, cfg.dtype, adapter_dtype, bias
            )["h100_s"]
            for name in providers:
                if name == "unsloth" and cfg.p > 0:
                    continue
                m = traffic_model.model(
                    name, mode, cfg.M, cfg.K, cfg.N, cfg.R, cfg.p, cfg.dtype, adapter_dtype, bias
                )
                lines.append(
                    f"| {PROVIDER_LABELS.get(name, name)} | {mode} | {m['flops'] / 1e9:.1f} | "
                    f"{m['bytes'] / 2**20:.0f} | {1e3 * m['h100_s']:.3f} | "
                    f"{m['h100_s'] / floor:.2f}x |"
                )
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--full", action="store_true", help="the full sweep (hours on a CPU)")
    which.add_argument("--smoke", action="store_true", help="a tiny set for tests (seconds)")
    which.add_argument(
        "--quick",
        action="store_true",
        help="CPU: fwd+bwd of the cpu backend at p=0.1 and p=0 against the floor and peft, "
        "all five interleaved on one shape (default 1k, M=4096, R=16, float32, with a "
        "frozen bias); prints medians and ratios, writes no CSV",
    )
    ap.add_argument("--layers", nargs="+", choices=sorted(LAYERS), help="only these shapes")
    ap.add_argument("--M", nargs="+", type=int, help="only these token counts")
    ap.add_argument("--R", nargs="+", type=int, help="only these ranks")
    ap.add_argument("--p", nargs="+", type=float, help="only these dropout probabilities")
    ap.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="only these dtypes")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument(
        "--providers",
        nargs="+",
        help="subset of: linear peft unsloth lk-<backend> (default: all usable)",
    )
    ap.add_argument(
        "--adapter-dtype",
        choices=("float32", "same"),
        default="float32",
        help="dtype of lora_A/lora_B: float32 (peft's default) or x's dtype",
    )
    ap.add_argument("--bias", action="store_true", help="give the base layer a bias")
    ap.add_argument("--reps", type=int, default=5, help="CPU: at least this many runs each")
    ap.add_argument("--max-reps", type=int, default=40, help="CPU: at most this many runs each")
    ap.add_argument(
        "--min-time",
        type=float,
        default=8.0,
        help="CPU: seconds of timed runs per shape, shared by its (provider, mode) pairs; "
        "a pair repeats past --reps until it has its share",
    )
    ap.add_argument(
        "--iters",
        type=int,
        help="CPU: exactly this many runs each, in place of --reps/--max-reps/--min-time "
        "(default 30 with --quick)",
    )
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="CPU: time with the thread's CPU clock (with --threads 1: ignores time spent "
        "descheduled on a shared machine)",
    )
    ap.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    ap.add_argument("--csv", type=Path, help="CSV to upsert (default results/<device>.csv)")
    ap.add_argument("--no-csv", action="store_true", help="do not write the CSV")
    ap.add_argument("--no-plot", action="store_true", help="do not draw the PNG plots")
    ap.add_argument("--plot-dir", type=Path, help="where the PNGs go (default: beside the CSV)")
    ap.add_argument(
        "--qlora",
        action="store_true",
        help="the QLoRA rows only: a 4-bit (nf4, double quant) base, --M/--R/--p/--layers",
    )
    ap.add_argument(
        "--model-only",
        action="store_true",
        help="print the traffic model's table for the selected shapes; time nothing",
    )
    ap.add_argument(
        "--device-kind",
        choices=("cpu", "cuda"),
        help="with --model-only: which device's shape set to model (default: cuda)",
    )
    return ap.parse_args(argv)


def select_configs(args, device_type: str) -> list[Config]:
    if args.smoke:
        configs = smoke_configs()
    elif args.full:
        configs = full_configs(device_type)
    else:
        configs = default_configs(device_type)
    if args.layers:
        configs = [c for c in configs if c.layer in args.layers]
    if args.M:
        configs = [c for c in configs if c.M in args.M]
    if args.R:
        configs = [c for c in configs if c.R in args.R]
    if args.p is not None:
        configs = [c for c in configs if c.p in args.p]
    if args.dtype:
        configs = [c for c in configs if c.dtype in {DTYPES[d] for d in args.dtype}]
    return configs


def quick_config(args) -> Config:
    """--quick's one shape: --layers, --M, --R (one each) or 1k, 4096, 16; float32."""

    def one(values, default, flag):
        if not values:
            return default
        if len(values) > 1:
            raise ValueError(f"--quick times one shape: give one {flag}, not {values}")
        return values[0]

    return Config(
        one(args.layers, "1k", "--layers"),
        one(args.M, 4096, "--M"),
        one(args.R, 16, "--R"),
        0.1,
        torch.float32,
    )


def print_header(env, device, providers, skipped, args) -> None:
    print(f"# lora_linear kernel benchmark on {env['device']}")
    print()
    print(harness.describe_line(env, ("torch", "triton", "peft")))
    if device.type == "cuda":
        print("Timing: triton.testing.do_bench, median (p20-p80), inputs rotated.")
    else:
        clock = "thread CPU clock" if args.cpu_time else "wall clock"
        if args.iters:
            count = f"each run {args.iters} times"
        else:
            count = (
                f"each run at least {args.reps} times and until it has its share of "
                f"{args.min_time:g} s per shape"
            )
        print(
            f"Timing: {clock}; all providers and modes interleaved in shuffled order, "
            f"{count}; median (p20-p80). "
            "Ratios are measured side by side in one run; on a shared machine the "
            "absolute times are noisy."
        )
    print(
        "Providers: "
        + ", ".join(PROVIDER_LABELS.get(p, p) for p in providers)
        + f"; adapters {args.adapter_dtype}; Unsloth-style runs at p = 0 only."
    )
    for name, why in skipped.items():
        print(f"Skipped lora_kernels backend {name!r}: {why}")
    print(
        "Ratios are provider time / floor time and provider time / peft time (lower is "
        "faster). MODEL columns: bytes by design and a roofline time on an H100 from "
        "datasheet values (benchmarks/traffic_model.py); a model, not a measurement."
    )
    print()


def select_providers(device, wanted) -> tuple[list[str], dict[str, str]]:
    """Providers usable on `device` (restricted to `wanted`), and why the others are not."""
    backends, skipped = usable_backends(device)
    providers = ["linear", "peft", "unsloth"] + [f"lk-{b}" for b in backends]
    try:
        import peft  # noqa: F401
    except ImportError as error:
        providers.remove("peft")
        skipped["peft"] = f"peft is not installed ({error})"
    providers += dora_providers(providers, backends)
    if wanted:
        unknown = set(wanted) - set(providers)
        if unknown:
            raise ValueError(f"providers not available here: {sorted(unknown)}")
        providers = [p for p in providers if p in wanted]
    if "linear" not in providers:
        providers.insert(0, "linear")  # ratios need the floor
    return providers, skipped


def run_qlora(args) -> int:
    """The QLoRA rows: the frozen Linear4bit, peft's lora.bnb.Linear4bit and LoRALinear
    on the same 4-bit base, fwd+bwd timed interleaved; saved and workspace bytes.
    Float32 compute, nf4 with double quantization; a Markdown table on stdout."""
    from providers import QLORA_FLOOR, make_qlora_set, qlora_baseline, qlora_saved_bytes

    from lora_kernels import qlora_op

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends, skipped = usable_backends(device)
    layer = (args.layers or ["1k"])[0]
    K, N = LAYERS[layer]
    env = harness.describe(device)
    print(f"# QLoRA (4-bit base) benchmark on {env['device']}\n")
    print(harness.describe_line(env, ("torch", "triton", "peft")))
    for name, why in skipped.items():
        print(f"Skipped lora_kernels backend {name!r}: {why}")
    print(
        "fwd+bwd, x requires grad, nf4 double-quant base, float32 compute and adapters; "
        "interleaved, median (p20-p80) ms. saved: activation bytes kept for backward "
        "(the packed weight and quant state excluded); workspace: the dequantize buffer.\n"
    )
    for M in args.M or [4096]:
        for R in args.R or [16]:
            for p in args.p if args.p is not None else [0.1, 0.0]:
                s = make_qlora_set(M, K, N, R, p, device, backends)
                names = list(s.fns)
                saved = {name: qlora_saved_bytes(s, name) for name in names}
                qlora_op.release_workspaces()
                s.fns[names[-1]](s.x)
                workspace = qlora_op.workspace_bytes()
                tasks = [Task(name, "fwd+bwd", [s]) for name in names]
                stats, _ = time_tasks(tasks, 1, device, args)
                floor = stats[(QLORA_FLOOR, "fwd+bwd")][0]
                print(f"### {layer} (K={K}, N={N}), M={M}, R={R}, p={p:g}\n")
                print(
                    "| provider | fwd+bwd ms | vs Linear4bit | vs peft (same variant) | saved MiB "
                    "| workspace MiB |"
                )
                print("|---|---|---|---|---|---|")
                for name in names:
                    median, p20, p80 = stats[(name, "fwd+bwd")]
                    peft = stats[(qlora_baseline(name), "fwd+bwd")][0]
                    ws = workspace / 2**20 if name.startswith("lk-") else 0.0
                    print(
                        f"| {name} | {median:.2f} ({p20:.2f}-{p80:.2f}) | {median / floor:.3f} "
                        f"| {median / peft:.3f} | {saved[name] / 2**20:.2f} | {ws:.2f} |"
                    )
                print()
    return 0


def dora_providers(providers, backends) -> list[str]:
    """DoRA beside LoRA: peft's use_dora=True layer (when peft is) and dora_linear on
    every usable backend."""
    return (["peft-dora"] if "peft" in providers else []) + [f"lk-dora-{b}" for b in backends]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model_only:
        kind = args.device_kind or "cuda"
        providers = args.providers or ["linear", "peft", "unsloth", "lk-triton", "lk-cuda"]
        print(model_table(select_configs(args, kind), providers, args.adapter_dtype, args.bias))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.qlora:
        return run_qlora(args)
    if args.quick:
        import cpu_quick

        try:
            cfg = quick_config(args)
        except ValueError as error:
            print(error, file=sys.stderr)
            return 2
        return cpu_quick.run(args, cfg)

    from tqdm import tqdm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = select_configs(args, device.type)
    if not configs:
        print("no configuration left after the filters", file=sys.stderr)
        return 2
    try:
        providers, skipped = select_providers(device, args.providers)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    env = harness.describe(device)
    print_header(env, device, providers, skipped, args)

    all_rows = []
    start = time.perf_counter()
    progress = tqdm(configs, desc="lora_linear", unit="shape", file=sys.stderr)
    for cfg in progress:
        progress.set_description(f"{cfg.layer} M={cfg.M} R={cfg.R} p={cfg.p:g}")
        rows = run_config(cfg, device, providers, args.modes, args, env, progress)
        all_rows += rows
        progress.write(
            f"### {cfg.title()}\n\n{markdown_table(rows, args.modes)}\n", file=sys.stdout
        )
    progress.close()
    print(f"Measured {len(configs)} shapes in {time.perf_counter() - start:.0f} s.")

    if not args.no_csv:
        path = args.csv or RESULTS / f"{harness.device_slug(env['device'])}.csv"
        harness.upsert_csv(path, all_rows, CSV_KEY, CSV_COLUMNS)
        print(f"Rows upserted into {path}")
        if not args.no_plot:
            import plot

            for png in plot.plot_csv(path, args.plot_dir or path.parent):
                print(f"Plot: {png}")
    bad = [r for r in all_rows if r["check"].startswith("FAIL")]
    if bad:
        print(f"OUTPUT CHECK FAILED for {sorted({r['provider'] for r in bad})}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
