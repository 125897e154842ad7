#!/usr/bin/env python3
"""`make gpu-check`: everything a short GPU slot should measure, in one command.

    python3 benchmarks/gpu_check.py OUT_DIR            # on a GPU machine (about 9 min cap)
    python3 benchmarks/gpu_check.py OUT_DIR --dry-run  # the same plumbing on a CPU (CI)

Runs on the machine's own Python with what is installed there (no installs, no
network), from a checkout that need not be pip-installed. Four steps, each in its own
process under its own timeout, so that a hang or a failure still leaves the others'
results:

1. build: the C++/CUDA extension built with ninja on every core (the JIT build of
   `lora_kernels.backend_cpp`, for this GPU's architecture only), or why not; then
   `python -m lora_kernels`.
2. tests: the tests of the triton and cuda backends (DoRA's triton kernels too) and of
   the 4-bit dequantize, natively, `-m "not slow"`, each launch autotuned over its
   first spill-free config only (compiles dominate there).
3. bench: the headline benchmark, bf16 M=8192 K=N=4096 R=16 at p=0 and p=0.1: the
   frozen nn.Linear, peft, the Unsloth-style composition, and lora_kernels' triton
   and cuda backends; the autotuner limited to `LORA_KERNELS_MAX_CONFIGS` configs per
   launch (default 3) so that compiling fits, and the configs it chose recorded.
4. profile: a torch.profiler table of the kernels of one forward+backward per provider.

OUT_DIR receives at most 8 files: build.log, tests.log, bench.log, bench.csv,
autotune.json (chosen configs, and the configs dropped for spilling), profile.log and
summary.json (device, versions, commit, each step's status and time, the test counts
and the headline rows). A short table is printed at the end. The exit status is 0 when
every step succeeded.

The dry run runs each step on a CPU with tiny shapes and Triton's interpreter, so that
CI keeps the plumbing working; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# name -> seconds on a GPU machine; they sum to 540 s, so that one gpu-check fits a
# 10-minute slot with the interpreter's start-up and the copy of its results.
GPU_TIMEOUTS = {"build": 150, "tests": 180, "bench": 150, "profile": 60}
DRY_TIMEOUTS = {"build": 300, "tests": 300, "bench": 300, "profile": 300}  # a loaded CI
STEPS = tuple(GPU_TIMEOUTS)
OUTPUT_FILES = ("build.log", "tests.log", "bench.log", "bench.csv", "autotune.json")
OUTPUT_FILES += ("profile.log", "summary.json")

# Configs each launch autotunes over (LORA_KERNELS_MAX_CONFIGS): every test shape is a new
# autotune key and each config a compile of about a second, so the tests take the first
# spill-free config; the benchmark tunes over three.
MAX_CONFIGS = {"tests": "1", "bench": "3", "profile": "3"}
# The tests of the backends that run on a GPU, CUDA extension first (no autotuning), then
# the 4-bit dequantize of every backend against bitsandbytes (one Triton config).
GPU_TESTS = ("tests/test_backend_cpp.py", "tests/test_dequantize_4bit.py")
GPU_TESTS += ("tests/test_backend_triton.py",)
# DoRA's own triton kernels (the flags of the forward, dY and dX kernels DoRA sets).
GPU_TESTS += ("tests/test_dora.py::test_dora_linear_on_triton_matches_peft_formula_float64",)
GPU_TESTS += ("tests/test_dora.py::test_zero_magnitude_rows_get_their_gradient_on_triton",)
GPU_TESTS += ("tests/test_backends.py", "tests/test_ops.py", "tests/test_numerics.py")
# The dry run's tests: one small case of each file's kind, seconds on a CPU.
DRY_TESTS = (
    "tests/test_backend_cpp.py::test_cpu_backend_is_usable",
    "tests/test_backend_triton.py::test_output_and_gradients_match_reference"
    "[M63-K70-N33-R7-fp32-p0.1-bias-learned-s]",
)

HEADLINE = dict(layer="8b-q/o", M=8192, R=16, dtype="bf16")
PROFILED = ("linear", "peft", "unsloth", "lk-triton", "lk-cuda")


# ---------------------------------------------------------------------------------------
# The driver: each step in a child process, under its timeout


def step_env(dry_run: bool, commit: str | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    env["PYTHONUNBUFFERED"] = "1"
    if commit:
        env["LORA_KERNELS_COMMIT"] = commit
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def step_argv(name: str, out: Path, dry_run: bool) -> list[str]:
    if name == "tests":
        selection = DRY_TESTS if dry_run else GPU_TESTS
        marks = [] if dry_run else ["-m", "not slow"]
        pytest = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider"]
        return [*pytest, *marks, "--durations=10", *selection]
    return [sys.executable, __file__, "--step", name, str(out)] + (["--dry-run"] * dry_run)


def run_step(name: str, out: Path, timeout: float, env: dict, dry_run: bool) -> dict:
    """Run step `name`, its stdout and stderr into OUT/<name>.log; its status and time."""
    log = out / f"{name}.log"
    start = time.monotonic()
    with log.open("w") as f:
        f.write(f"# gpu-check step {name}, timeout {timeout:.0f} s\n")
        f.flush()
        child = subprocess.Popen(
            step_argv(name, out, dry_run),
            cwd=REPO,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = child.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, 9)  # the step and whatever it started (compilers)
            child.wait()
            status = f"timed out after {timeout:.0f} s"
    seconds = time.monotonic() - start
    with log.open("a") as f:
        f.write(f"\n# gpu-check step {name}: {status} in {seconds:.1f} s\n")
    return {"status": status, "seconds": round(seconds, 1), "timeout_s": timeout}


def test_counts(log: Path) -> dict:
    """passed/failed/skipped/error counts read off pytest -v's per-test lines (which a
    killed run still has)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0, "xfailed": 0}
    if not log.exists():
        return counts
    for line in log.read_text(errors="replace").splitlines():
        match = re.search(r"::\S+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL)\b", line)
        if match:
            word = match.group(1).lower()
            counts["xfailed" if word == "xfail" else word] += 1
    return counts


def environment(commit: str | None) -> dict:
    """Device, versions and commit, read in a child so that a broken import cannot stop
    the driver."""
    code = (
        "import json, platform, torch\n"
        "info = {'python': platform.python_version(), 'torch': torch.__version__,\n"
        "        'cuda': torch.version.cuda, 'device': 'cpu'}\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    info.update(device=p.name, capability=f'{p.major}.{p.minor}',\n"
        "                memory_gib=round(p.total_memory / 2**30, 1),\n"
        "                sms=p.multi_processor_count)\n"
        "for m in ('triton', 'peft', 'transformers', 'lora_kernels'):\n"
        "    try: info[m] = __import__(m).__version__\n"
        "    except Exception as e: info[m] = f'absent ({type(e).__name__})'\n"
        "print(json.dumps(info))\n"
    )
    env = step_env(False, commit)
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        info = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-2000:]}
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as error:
        info = {"error": repr(error)}
    sys.path.insert(0, str(HERE))
    import harness

    info["commit"] = commit or harness.git_commit()
    info["date"] = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    info["host"] = {"cpus": os.cpu_count(), "machine": platform.machine()}
    return info


def headline_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    keep = ("provider", "p", "mode", "median_ms", "vs_floor", "vs_peft", "saved_bytes")
    keep += ("peak_bytes", "check", "model_h100_vs_floor")
    with path.open() as f:
        return [{k: row[k] for k in keep} for row in csv.DictReader(f)]


def summary_table(summary: dict) -> str:
    env = summary["environment"]
    lines = [
        f"gpu-check on {env.get('device')} (torch {env.get('torch')}, triton "
        f"{env.get('triton')}, commit {env.get('commit')}){' DRY RUN' * summary['dry_run']}",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
    ]
    for name, step in summary["steps"].items():
        lines.append(f"| {name} | {step['status']} | {step['seconds']} |")
    counts = summary["tests"]
    lines += ["", "tests: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)]
    rows = [r for r in summary["bench"] if r["mode"] == "fwd+bwd"]
    if rows:
        lines += ["", "| fwd+bwd | p | ms | vs floor | vs peft | check |", "|---" * 6 + "|"]
        for r in rows:
            ms, floor, peft = (float(r[k] or "nan") for k in ("median_ms", "vs_floor", "vs_peft"))
            lines.append(
                f"| {r['provider']} | {r['p']} | {ms:.3f} | {floor:.2f}x | {peft:.2f}x | "
                f"{r['check']} |"
            )
    return "\n".join(lines)


def drive(args) -> int:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # a rerun into the same directory leaves no stale file
        (out / name).unlink(missing_ok=True)
    timeouts = dict(DRY_TIMEOUTS if args.dry_run else GPU_TIMEOUTS)
    for item in args.timeout:
        name, _, seconds = item.partition("=")
        if name not in timeouts or not re.fullmatch(r"\d+(\.\d+)?", seconds):
            raise SystemExit(f"--timeout: expected STEP=SECONDS with STEP in {STEPS}, got {item!r}")
        timeouts[name] = float(seconds)
    steps = args.steps or list(STEPS)
    env = step_env(args.dry_run, args.commit)
    summary = {"dry_run": args.dry_run, "environment": environment(args.commit), "steps": {}}
    for name in steps:
        print(f"gpu-check: {name} (timeout {timeouts[name]:.0f} s) ...", flush=True)
        env_of_step = {"LORA_KERNELS_MAX_CONFIGS": MAX_CONFIGS.get(name, "3"), **env}
        summary["steps"][name] = run_step(name, out, timeouts[name], env_of_step, args.dry_run)
        print(f"gpu-check: {name}: {summary['steps'][name]['status']}", flush=True)
    summary["tests"] = test_counts(out / "tests.log")
    summary["bench"] = headline_rows(out / "bench.csv")
    autotune = out / "autotune.json"
    summary["autotune"] = json.loads(autotune.read_text()) if autotune.exists() else None
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(summary_table(summary))
    print(f"\nResults in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0 if all(s["status"] == "ok" for s in summary["steps"].values()) else 1


# ---------------------------------------------------------------------------------------
# The steps, each run in its own process by `drive`


def step_build(out: Path, dry_run: bool) -> int:
    import torch

    if torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = torch.cuda.get_device_capability()
        os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # this GPU only: half the time
    from lora_kernels import backend_cpp

    print("CUDA toolkit:", backend_cpp.find_cuda_home())
    print("CUDA build possible:", backend_cpp.cuda_build_possible())
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "(default)")
    print(f"MAX_JOBS={os.environ.get('MAX_JOBS')} TORCH_CUDA_ARCH_LIST={arch}")
    start = time.monotonic()
    ok, why = backend_cpp.extension_status()
    print(f"extension: {'ok' if ok else 'FAILED'} in {time.monotonic() - start:.1f} s: {why}")
    subprocess.run([sys.executable, "-m", "lora_kernels"], check=False)
    cuda_ok, cuda_why = backend_cpp.availability("cuda")
    print(f"cuda backend: {'usable' if cuda_ok else 'not usable'}: {cuda_why}")
    if dry_run:
        return 0 if ok else 1
    return 0 if ok and cuda_ok else 1


def step_bench(out: Path, dry_run: bool) -> int:
    sys.path.insert(0, str(HERE))
    import bench_lora_linear

    if dry_run:
        argv = ["--smoke", "--device", "cpu", "--providers", "linear", "peft", "lk-torch"]
        argv += ["lk-cpu", "--min-time", "0", "--reps", "2", "--max-reps", "2"]
    else:
        argv = ["--layers", HEADLINE["layer"], "--M", str(HEADLINE["M"])]
        argv += ["--R", str(HEADLINE["R"]), "--p", "0", "0.1", "--dtype", HEADLINE["dtype"]]
    rc = bench_lora_linear.main([*argv, "--csv", str(out / "bench.csv"), "--no-plot"])
    record = {"max_configs": os.environ.get("LORA_KERNELS_MAX_CONFIGS"), "chosen": []}
    record["dropped_for_spilling"] = []
    try:
        from lora_kernels.backend_triton import launch
    except ImportError as error:
        record["error"] = f"triton backend not importable: {error}"
    else:
        record["chosen"] = launch.autotune_choices()
        record["dropped_for_spilling"] = [
            {"kernel": name, "config": str(key), "n_spills": n}
            for (name, key), n in launch.SPILLED.items()
        ]
    (out / "autotune.json").write_text(json.dumps(record, indent=2) + "\n")
    return rc


def step_profile(out: Path, dry_run: bool) -> int:
    sys.path.insert(0, str(HERE))
    import torch
    from bench_lora_linear import Config, select_providers
    from harness import DTYPES
    from providers import make_input_set
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cpu" if dry_run else "cuda")
    if dry_run:
        shapes = {p: Config("tiny", 64, 4, p, torch.float32) for p in (0.0, 0.1)}
    else:
        shapes = {
            p: Config(HEADLINE["layer"], HEADLINE["M"], HEADLINE["R"], p, DTYPES[HEADLINE["dtype"]])
            for p in (0.0, 0.1)
        }
    usable, skipped = select_providers(device, None)
    for name, why in skipped.items():
        print(f"not profiled: {name}: {why}")
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * (device.type == "cuda")
    sort = "self_cpu_time_total" if device.type == "cpu" else "self_device_time_total"
    for name in [p for p in PROFILED if p in usable] + ["lk-torch"] * dry_run:
        cfg = shapes[0.0 if name == "unsloth" else 0.1]
        s = make_input_set(cfg, device, torch.float32, False, [name], seed=7)
        fn = s.fns[name]
        fn(s.x).backward(s.dy)  # compiled, tuned and warm before the profiled call
        if device.type == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            fn(s.x).backward(s.dy)
            if device.type == "cuda":
                torch.cuda.synchronize()
        print(f"\n## {name}: one forward+backward, {cfg.title()}\n")
        print(prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=60))
        del s, fn, prof
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="directory for the results (at most 8 files)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreter")
    ap.add_argument("--commit", help="the commit measured (where the tree has no .git)")
    ap.add_argument("--steps", nargs="+", choices=STEPS, help="only these steps")
    ap.add_argument(
        "--timeout", action="append", default=[], metavar="STEP=SECONDS", help="override"
    )
    ap.add_argument("--step", choices=("build", "bench", "profile"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        return globals()[f"step_{args.step}"](args.out.resolve(), args.dry_run)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
