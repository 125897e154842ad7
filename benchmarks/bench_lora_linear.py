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
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import itertools
import math
import os
import platform
import random
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # traffic_model and plot live beside this file
    sys.path.insert(0, str(HERE))
try:
    import lora_kernels
except ImportError:  # a checkout run without `pip install -e .` or PYTHONPATH
    sys.path.insert(0, str(REPO))
    import lora_kernels

import traffic_model  # noqa: E402

from lora_kernels.backends import resolve_backend  # noqa: E402
from lora_kernels.memory import saved_activations  # noqa: E402
from lora_kernels.reference import lora_linear_reference  # noqa: E402

RESULTS = HERE / "results"
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
LORA_ALPHA = 16.0

# (K, N) = (in_features, out_features) of real projections.
LAYERS = {
    "8b-q/o": (4096, 4096),
    "8b-k/v": (4096, 1024),
    "8b-gate/up": (4096, 14336),
    "8b-down": (14336, 4096),
    "70b-q/o": (8192, 8192),
    "1k": (1024, 1024),  # the issue-4 CPU figure (K = N = 1024)
    "tiny": (48, 40),
}
LAYER_NOTES = {
    "8b-q/o": "Llama-3-8B q_proj/o_proj",
    "8b-k/v": "Llama-3-8B k_proj/v_proj",
    "8b-gate/up": "Llama-3-8B gate_proj/up_proj",
    "8b-down": "Llama-3-8B down_proj",
    "70b-q/o": "Llama-3-70B q_proj/o_proj",
    "1k": "K=N=1024 (the issue-4 CPU figure)",
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
}
CSV_KEY = (
    "device",
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
    "threads",
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
    """The `make bench` set: the issue-3/4 figures plus one real projection."""
    if device_type == "cuda":
        bf16 = torch.bfloat16
        return [
            Config("8b-q/o", 8192, 16, 0.1, bf16),  # the issue-3 figure
            Config("8b-q/o", 8192, 16, 0.0, bf16),
            Config("8b-gate/up", 8192, 16, 0.1, bf16),
            Config("8b-down", 8192, 16, 0.1, bf16),
            Config("70b-q/o", 4096, 16, 0.1, bf16),
            Config("8b-q/o", 8192, 16, 0.1, torch.float16),
        ]
    f32 = torch.float32
    return [
        Config("1k", 4096, 16, 0.1, f32),  # the issue-4 figures
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
# Environment: device name, versions, commit


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1]
                break
        else:
            name = platform.processor() or platform.machine()
    except OSError:
        name = platform.processor() or platform.machine()
    name = re.sub(r"\((R|TM|tm|r)\)", "", name)
    return " ".join(name.split())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {cpu_name()} ({os.cpu_count()} cores)"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for module in ("triton", "peft"):
        try:
            out[module] = __import__(module).__version__
        except ImportError:
            out[module] = "absent"
    return out


def git_commit() -> str:
    """Short commit of this checkout, "-dirty" if files outside results/ changed."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", ".", ":!benchmarks/results"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if status else "")


def cache_bytes(device: torch.device) -> int:
    """L2 on a GPU, the last-level cache on a CPU (32 MiB if unknown)."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        if size > 0:
            return size
    except (ValueError, OSError):
        pass
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("K")) << 10 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return 32 << 20


# ---------------------------------------------------------------------------------------
# Providers


def usable_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """lora_kernels backends that run on `device` here, and why the others are skipped."""
    usable, skipped = [], {}
    for name, (ok, reason) in lora_kernels.available_backends().items():
        if not ok:
            skipped[name] = f"not usable: {reason}"
        elif name == "triton" and device.type == "cpu":
            skipped[name] = (
                "skipped on CPU: Triton runs here only interpreted (TRITON_INTERPRET=1), "
                "which times the interpreter, not the kernels"
            )
        else:
            try:
                resolve_backend(device.type, name)
            except RuntimeError as error:
                skipped[name] = str(error)
            else:
                usable.append(name)
    return usable, skipped


class _OneLayer(nn.Module):
    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def build_peft_layer(weight, bias, lora_A, lora_B, R, alpha, p) -> nn.Module:
    """peft's lora.Linear around an nn.Linear holding `weight`, via get_peft_model.

    The adapter parameters are then set to the shared `lora_A`, `lora_B` (float32 by
    default, as peft makes them for a half-precision base), so every provider computes
    on identical values.
    """
    from peft import LoraConfig, get_peft_model

    N, K = weight.shape
    base = torch.nn.utils.skip_init(
        nn.Linear, K, N, bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    base.weight = weight
    if bias is not None:
        base.bias = bias
    config = LoraConfig(r=R, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(_OneLayer(base), config)
    layer = model.base_model.model.proj
    layer.lora_A["default"].weight = lora_A
    layer.lora_B["default"].weight = lora_B
    assert math.isclose(layer.scaling["default"], alpha / R)
    layer.train()
    return layer


@dataclass
class InputSet:
    """One rotation slot: x, dY and the layer's tensors, shared by every provider."""

    x: torch.Tensor
    dy: torch.Tensor
    weight: nn.Parameter
    bias: nn.Parameter | None
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    fns: dict = field(default_factory=dict)

    def params(self) -> list[torch.Tensor]:
        return [t for t in (self.weight, self.bias, self.lora_A, self.lora_B) if t is not None]

    def grads_to_none(self) -> list[torch.Tensor]:
        return [self.x, self.lora_A, self.lora_B]


def make_input_set(cfg, device, adapter_dtype, bias, providers, seed) -> InputSet:
    g = torch.Generator(device="cpu").manual_seed(seed)
    M, K, N, R = cfg.M, cfg.K, cfg.N, cfg.R

    def rand(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rand(M, K, dtype=cfg.dtype).requires_grad_()
    dy = rand(M, N, dtype=cfg.dtype)
    weight = nn.Parameter(rand(N, K, dtype=cfg.dtype, scale=K**-0.5), requires_grad=False)
    b = nn.Parameter(rand(N, dtype=cfg.dtype), requires_grad=False) if bias else None
    lora_A = nn.Parameter(rand(R, K, dtype=adapter_dtype, scale=K**-0.5))
    lora_B = nn.Parameter(rand(N, R, dtype=adapter_dtype, scale=R**-0.5))
    s = LORA_ALPHA / R
    p = cfg.p
    fns = {}
    for name in providers:
        if name == "linear":
            fns[name] = lambda x, w=weight, b=b: torch.nn.functional.linear(x, w, b)
        elif name == "peft":
            fns[name] = build_peft_layer(weight, b, lora_A, lora_B, R, LORA_ALPHA, p)
        elif name == "unsloth":

            def unsloth(x, w=weight, b=b, A=lora_A, B=lora_B, s=s):
                out = torch.nn.functional.linear(x, w, b)
                xa = x @ A.t().to(x.dtype)
                return out.addmm_(xa, B.t().to(x.dtype), alpha=s)

            fns[name] = unsloth
        else:
            backend = name.removeprefix("lk-")

            def lk(x, w=weight, b=b, A=lora_A, B=lora_B, s=s, backend=backend):
                return lora_kernels.lora_linear(
                    x, w, b, A, B, s, dropout_p=p, training=True, backend=backend
                )

            fns[name] = lk
    return InputSet(x, dy, weight, b, lora_A, lora_B, fns)


# ---------------------------------------------------------------------------------------
# Timing


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass
class Task:
    """One (provider, mode) to time; `run(i)` does one call on input set i."""

    provider: str
    mode: str
    sets: list[InputSet]
    graphs: list = field(default_factory=list)

    def prepare(self) -> None:
        if self.mode == "bwd":
            self.graphs = [s.fns[self.provider](s.x) for s in self.sets]

    def zero_grads(self, i: int) -> None:
        for t in self.sets[i].grads_to_none():
            t.grad = None

    def run(self, i: int) -> None:
        s = self.sets[i]
        if self.mode == "fwd":
            s.fns[self.provider](s.x)
        elif self.mode == "bwd":
            self.graphs[i].backward(s.dy, retain_graph=True)
        else:
            s.fns[self.provider](s.x).backward(s.dy)


def time_interleaved_cpu(tasks, n_sets, min_reps, max_reps, min_time, progress=None):
    """Wall-clock times of every task, interleaved in a shuffled order each rep.

    Every task runs at least `min_reps` times; after that a task keeps its place in the
    reps until its timed runs add up to its share of `min_time` (min_time / number of
    tasks) or it reaches `max_reps`, so cheap tasks collect more samples while an
    expensive one does not stretch the run.
    """
    for task in tasks:  # warm-up: first-call costs (op registration, allocator) stay out
        task.zero_grads(0)
        t0 = time.perf_counter()
        task.run(0)
        if time.perf_counter() - t0 < 0.5:
            task.zero_grads(0)
            task.run(0)
    samples = {(t.provider, t.mode): [] for t in tasks}
    share = min_time / len(tasks)
    rng = random.Random(0)
    rep = 0
    while True:
        if rep < min_reps:
            order = list(tasks)
        else:
            order = [
                t
                for t in tasks
                if sum(samples[(t.provider, t.mode)]) < share
                and len(samples[(t.provider, t.mode)]) < max_reps
            ]
        if not order:
            break
        rng.shuffle(order)
        i = rep % n_sets
        gc.collect()
        gc.disable()
        try:
            for task in order:
                task.zero_grads(i)
                t0 = time.perf_counter()
                task.run(i)
                samples[(task.provider, task.mode)].append(time.perf_counter() - t0)
        finally:
            gc.enable()
        rep += 1
        if progress is not None:
            progress.set_postfix_str(f"rep {rep}")
    return {key: [1e3 * v for v in vals] for key, vals in samples.items()}


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
        out[(task.provider, task.mode)] = (median, p20, p80)
    return out


# ---------------------------------------------------------------------------------------
# Memory, checks


def saved_bytes(s: InputSet, provider: str) -> int:
    _, saved = saved_activations(lambda: s.fns[provider](s.x), exclude=s.params())
    return saved.bytes


def peak_bytes_gpu(s: InputSet, provider: str) -> int:
    """Peak memory of one fwd+bwd above what was allocated before it."""
    torch.cuda.synchronize()
    for t in s.grads_to_none():
        t.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    s.fns[provider](s.x).backward(s.dy)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


CHECK_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def check_output(s: InputSet, provider: str, cfg: Config) -> str:
    """Relative error of the forward output against the float64 reference (p = 0 only)."""
    if cfg.p > 0:
        return "-"
    with torch.no_grad():
        y = s.fns[provider](s.x).double()
        if provider == "linear":
            ref = torch.nn.functional.linear(
                s.x.double(), s.weight.double(), None if s.bias is None else s.bias.double()
            )
        else:
            ref = lora_linear_reference(
                s.x.double(),
                s.weight.double(),
                None if s.bias is None else s.bias.double(),
                s.lora_A.double(),
                s.lora_B.double(),
                LORA_ALPHA / cfg.R,
                0.0,
            )
    err = float((y - ref).norm() / ref.norm())
    return f"ok {err:.1e}" if err <= CHECK_TOL[cfg.dtype] else f"FAIL {err:.1e}"


# ---------------------------------------------------------------------------------------
# One configuration


def n_rotation_sets(cfg: Config, device: torch.device, adapter_dtype) -> int:
    """Enough input sets that one rotation exceeds twice the cache (at most 4)."""
    e = torch.empty((), dtype=cfg.dtype).element_size()
    per_set = e * (2 * cfg.M * cfg.K + cfg.N * cfg.K + 2 * cfg.M * cfg.N)
    return max(1, min(4, math.ceil(2 * cache_bytes(device) / per_set)))


def run_config(cfg, device, providers, modes, args, env, progress=None) -> list[dict]:
    adapter_dtype = cfg.dtype if args.adapter_dtype == "same" else torch.float32
    providers = [p for p in providers if not (p == "unsloth" and cfg.p > 0)]
    n_sets = n_rotation_sets(cfg, device, adapter_dtype)
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
    if device.type == "cuda":
        stats = time_do_bench_gpu(tasks, n_sets)
        reps = {key: "do_bench" for key in stats}
    else:
        samples = time_interleaved_cpu(
            tasks, n_sets, args.reps, args.max_reps, args.min_time, progress
        )
        stats, reps = {}, {}
        for key, vals in samples.items():
            vals = sorted(vals)
            stats[key] = (quantile(vals, 0.5), quantile(vals, 0.2), quantile(vals, 0.8))
            reps[key] = len(vals)
    del tasks, sets
    gc.collect()

    rows = []
    for name in providers:
        for mode in modes:
            median, p20, p80 = stats[(name, mode)]
            floor = stats.get(("linear", mode), (math.nan,))[0]
            peft = stats.get(("peft", mode), (math.nan,))[0]
            m = traffic_model.model(
                name, mode, cfg.M, cfg.K, cfg.N, cfg.R, cfg.p, cfg.dtype, adapter_dtype, args.bias
            )
            m_floor = traffic_model.model(
                "linear",
                mode,
                cfg.M,
                cfg.K,
                cfg.N,
                cfg.R,
                cfg.p,
                cfg.dtype,
                adapter_dtype,
                args.bias,
            )
            rows.append(
                {
                    "date": env["date"],
                    "device": env["device"],
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
                    "backend": name.removeprefix("lk-") if name.startswith("lk-") else "",
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
                    "timer": "do_bench" if device.type == "cuda" else "wall-clock, interleaved",
                    "threads": env["threads"],
                    "torch": env["torch"],
                    "triton": env["triton"],
                    "peft": env["peft"],
                    "commit": env["commit"],
                }
            )
    return rows


# ---------------------------------------------------------------------------------------
# Output: Markdown table, CSV upsert


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


def upsert_csv(path: Path, rows: list[dict], key=CSV_KEY, columns=CSV_COLUMNS) -> None:
    """Replace rows with the same key (device, shape, provider, mode), append the rest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key_columns = key

    def key(r):
        return tuple(str(r[k]) for k in key_columns)

    merged = {}
    if path.exists():
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                merged[key(r)] = r
    for r in rows:
        out = {}
        for k in columns:
            v = r.get(k, "")
            out[k] = f"{v:.6g}" if isinstance(v, float) else v
        merged[key(out)] = out
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged.values())


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
    ap.add_argument("--threads", type=int, help="torch.set_num_threads on CPU")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    ap.add_argument("--csv", type=Path, help="CSV to upsert (default results/<device>.csv)")
    ap.add_argument("--no-csv", action="store_true", help="do not write the CSV")
    ap.add_argument("--no-plot", action="store_true", help="do not draw the PNG plots")
    ap.add_argument("--plot-dir", type=Path, help="where the PNGs go (default: beside the CSV)")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model_only:
        kind = args.device_kind or "cuda"
        providers = args.providers or ["linear", "peft", "unsloth", "lk-triton", "lk-cuda"]
        print(model_table(select_configs(args, kind), providers, args.adapter_dtype, args.bias))
        return 0

    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configs = select_configs(args, device.type)
    if not configs:
        print("no configuration left after the filters", file=sys.stderr)
        return 2
    backends, skipped = usable_backends(device)
    providers = ["linear", "peft", "unsloth"] + [f"lk-{b}" for b in backends]
    try:
        import peft  # noqa: F401
    except ImportError as error:
        providers.remove("peft")
        skipped["peft"] = f"peft is not installed ({error})"
    if args.providers:
        unknown = set(args.providers) - set(providers)
        if unknown:
            print(f"providers not available here: {sorted(unknown)}", file=sys.stderr)
            return 2
        providers = [p for p in providers if p in args.providers]
    if "linear" not in providers:
        providers.insert(0, "linear")  # ratios need the floor

    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else "",
        "commit": git_commit(),
        **versions(),
    }
    print(f"# lora_linear kernel benchmark on {env['device']}")
    print()
    print(
        f"torch {env['torch']}, triton {env['triton']}, peft {env['peft']}, "
        f"commit {env['commit']}, {env['date']}"
        + (f", {env['threads']} threads" if env["threads"] else "")
    )
    if device.type == "cuda":
        print("Timing: triton.testing.do_bench, median (p20-p80), inputs rotated.")
    else:
        print(
            "Timing: wall clock; all providers and modes interleaved in shuffled order, "
            f"each run at least {args.reps} times and until it has its share of "
            f"{args.min_time:g} s per shape; median (p20-p80). "
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
        path = args.csv or RESULTS / f"{device_slug(env['device'])}.csv"
        upsert_csv(path, all_rows)
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
