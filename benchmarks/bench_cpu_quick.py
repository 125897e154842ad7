"""Quick CPU figures of issue 4: forward+backward of the "cpu" backend against a frozen
nn.Linear and peft's lora.Linear, measured side by side (interleaved) in one run.

    python benchmarks/bench_cpu_quick.py [--M 4096 --K 1024 --N 1024 --R 16 --iters 30]

Prints the median time of each variant and the ratios of issue 4 (targets: p=0.1 at
most 1.15x the frozen nn.Linear and 0.8x peft; p=0 at most 1.05x the nn.Linear).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lora_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--M", type=int, default=4096)
    parser.add_argument("--K", type=int, default=1024)
    parser.add_argument("--N", type=int, default=1024)
    parser.add_argument("--R", type=int, default=16)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with the thread's CPU clock (with --threads 1: ignores time spent "
        "descheduled on a shared machine)",
    )
    args = parser.parse_args()
    clock = time.thread_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    M, K, N, R = args.M, args.K, args.N, args.R
    torch.manual_seed(0)
    base = torch.nn.Linear(K, N).requires_grad_(False)
    x = torch.randn(M, K, requires_grad=True)
    grad_y = torch.randn(M, N)
    A = (torch.randn(R, K) / K**0.5).requires_grad_()
    B = (torch.randn(N, R) / R**0.5).requires_grad_()
    s = 2.0

    def step(fn, params):
        y = fn()
        y.backward(grad_y)
        x.grad = None
        for p in params:
            p.grad = None

    variants = {"nn.Linear (frozen)": (lambda: base(x), [])}
    for p in (0.1, 0.0):
        variants[f"cpu p={p}"] = (
            lambda p=p: lora_kernels.lora_linear(
                x, base.weight, base.bias, A, B, s, p, backend="cpu"
            ),
            [A, B],
        )
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear

        for p in (0.1, 0.0):
            config = LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=p)
            layer = PeftLinear(base, "default", config, r=R, lora_alpha=2 * R, lora_dropout=p)
            layer.train()
            params = [q for q in layer.parameters() if q.requires_grad]
            variants[f"peft p={p}"] = (lambda layer=layer: layer(x), params)
    except ImportError as error:
        print(f"peft not available ({error}); skipping the peft comparison")

    for fn, params in variants.values():  # warm-up (and the JIT build of the extension)
        for _ in range(3):
            step(fn, params)
    times = {name: [] for name in variants}
    for i in range(args.iters):
        names = list(variants)
        names = names[i % len(names) :] + names[: i % len(names)]  # rotate the order
        for name in names:
            fn, params = variants[name]
            t0 = clock()
            step(fn, params)
            times[name].append(clock() - t0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(
        f"forward+backward, M={M} K={K} N={N} R={R} float32, {torch.get_num_threads()} threads, "
        f"{args.iters} interleaved iterations, {'thread CPU' if args.cpu_time else 'wall'} time, "
        f"CPU kernels: {lora_kernels.backend_cpp.cpu_isa()}"
    )
    for name, t in med.items():
        q = sorted(times[name])
        p20, p80 = q[len(q) // 5] * 1e3, q[(4 * len(q)) // 5] * 1e3
        print(f"  {name:20s} median {t:8.2f} ms  (p20 {p20:.2f}, p80 {p80:.2f})")
    lin = med["nn.Linear (frozen)"]
    for p, target in ((0.1, 1.15), (0.0, 1.05)):
        print(f"  cpu p={p} / nn.Linear   {med[f'cpu p={p}'] / lin:.3f}   (target <= {target})")
    if "peft p=0.1" in med:
        for p in (0.1, 0.0):
            print(f"  cpu p={p} / peft p={p}  {med[f'cpu p={p}'] / med[f'peft p={p}']:.3f}", end="")
            print("   (target <= 0.8)" if p == 0.1 else "")


if __name__ == "__main__":
    main()
