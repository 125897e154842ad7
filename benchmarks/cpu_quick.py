"""`bench_lora_linear.py --quick`: the short CPU comparison of the `cpu` backend.

Forward+backward of five variants on one float32 shape with a frozen bias, all
interleaved in one loop (so both dropout settings are held to the same floor): the
frozen nn.Linear, lora_kernels' `cpu` backend at p=0.1 and p=0, and peft's
lora.Linear at p=0.1 and p=0. Prints each median (p20, p80) and the ratios the
project's CPU targets are stated in (README, docs/cpu_performance.md): `cpu` at
p=0.1 and p=0 over the floor, and over peft at the same p. Writes no CSV.

    python benchmarks/bench_lora_linear.py --quick [--layers 1k --M 4096 --R 16]
        [--iters 30] [--threads 1 --cpu-time]
"""

from __future__ import annotations

import dataclasses
import sys
import time

import harness
import torch
from providers import Task, make_input_set, provider_fn, usable_backends

import lora_kernels

FLOOR = "nn.Linear (frozen)"
# The CPU targets: (p, most the `cpu` backend may take over the floor).
FLOOR_TARGETS = ((0.1, 1.15), (0.0, 1.05))
PEFT_TARGET_AT_P01 = 0.8


def build_tasks(cfg, device) -> tuple[list[Task], list[str]]:
    """The variants as tasks on one shared input set of `cfg`'s shape, and notes to print."""
    notes, names = [], ["linear", "lk-cpu"]
    try:
        import peft  # noqa: F401

        names.append("peft")
    except ImportError as error:
        notes.append(f"peft not available ({error}); skipping the peft comparison")
    base = make_input_set(cfg, device, torch.float32, True, names, seed=1000)
    # One copy of the tensors: each p gets its own functions over the same x, W, A, B.
    sets = {p: dataclasses.replace(base, fns={}) for p in (0.1, 0.0)}
    for p, s in sets.items():
        s.fns = {name: provider_fn(name, s, p) for name in names}
    tasks = [Task("linear", "fwd+bwd", [sets[0.1]], key=FLOOR)]
    for name, label in (("lk-cpu", "cpu"), ("peft", "peft")):
        if name in names:
            tasks += [Task(name, "fwd+bwd", [sets[p]], key=f"{label} p={p}") for p in sets]
    return tasks, notes


def report(med: dict, stats: dict, cfg, args, iters: int) -> str:
    """The quick comparison's lines: medians, then the ratios with their targets."""
    clock = "thread CPU" if args.cpu_time else "wall"
    lines = [
        f"forward+backward, M={cfg.M} K={cfg.K} N={cfg.N} R={cfg.R} float32, "
        f"{torch.get_num_threads()} threads, {iters} interleaved iterations, {clock} time, "
        f"CPU kernels: {lora_kernels.backend_cpp.cpu_isa()}"
    ]
    for name, (median, p20, p80) in stats.items():
        lines.append(f"  {name:20s} median {median:8.2f} ms  (p20 {p20:.2f}, p80 {p80:.2f})")
    for p, target in FLOOR_TARGETS:
        ratio = med[f"cpu p={p}"] / med[FLOOR]
        lines.append(f"  cpu p={p} / nn.Linear   {ratio:.3f}   (target <= {target})")
    if "peft p=0.1" in med:
        for p in (0.1, 0.0):
            ratio = med[f"cpu p={p}"] / med[f"peft p={p}"]
            target = f"   (target <= {PEFT_TARGET_AT_P01})" if p == 0.1 else ""
            lines.append(f"  cpu p={p} / peft p={p}  {ratio:.3f}{target}")
    return "\n".join(lines)


def run(args, cfg) -> int:
    """Time the quick comparison on `cfg`'s shape and print it; 2 if it cannot run here."""
    device = torch.device("cpu")
    if args.device == "cuda":
        print("--quick times the CPU backend; leave out --device cuda", file=sys.stderr)
        return 2
    backends, skipped = usable_backends(device)
    if "cpu" not in backends:
        print(f"--quick needs the cpu backend: {skipped.get('cpu')}", file=sys.stderr)
        return 2
    tasks, notes = build_tasks(cfg, device)
    for note in notes:
        print(note)
    iters = args.iters or 30
    # Three untimed calls each: the first also builds the extension on a fresh checkout.
    samples = harness.time_interleaved(
        tasks,
        min_reps=iters,
        warmup=3,
        order="rotate",
        clock=time.thread_time if args.cpu_time else time.perf_counter,
    )
    stats = {key: harness.summarize(vals, 1e3) for key, vals in samples.items()}
    med = {key: s[0] for key, s in stats.items()}
    print(report(med, stats, cfg, args, iters))
    return 0
