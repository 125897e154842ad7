"""What every benchmark runner shares: the run's description, the interleaved timing
loop with its median/p20/p80, and the CSV upsert that the plots are drawn from.

- environment: `describe(device)` gives the columns that say where and with what a
  row was measured (date, device, threads, versions, git commit);
- timing: `time_interleaved` runs `Timed` tasks rep after rep, each rep in a new
  order, so a machine shared with other work slows every task alike; `summarize`
  turns a task's samples into (median, p20, p80);
- results: `upsert_csv` replaces the rows with the same key and keeps the others.
"""

from __future__ import annotations

import csv
import datetime
import gc
import math
import os
import platform
import random
import re
import subprocess
import time
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


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
    """Short commit of this checkout, "-dirty" if files outside results/ changed;
    `LORA_KERNELS_COMMIT` where the tree is a copy without git (a GPU machine's)."""
    if os.environ.get("LORA_KERNELS_COMMIT"):
        return os.environ["LORA_KERNELS_COMMIT"]
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


def describe(device: torch.device) -> dict:
    """The columns every row carries: date, device, threads (CPU), commit, versions."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else "",
        "commit": git_commit(),
        **versions(),
    }


def describe_line(env: dict, packages: Iterable[str]) -> str:
    """`torch 2.x, peft 0.y, commit abc, <date>, 2 threads` for a run's header."""
    parts = [f"{name} {env[name]}" for name in packages]
    parts += [f"commit {env['commit']}", env["date"]]
    if env["threads"]:
        parts.append(f"{env['threads']} threads")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------
# Timing


class Timed:
    """One task of an interleaved run: `run(i)` is timed on input set i.

    `before(i)` and `after(i)` run untimed around it (clearing gradients, restoring
    an RNG state, reading a loss). `key` names the task's samples.
    """

    key: Hashable

    def before(self, i: int) -> None:
        pass

    def run(self, i: int) -> None:
        raise NotImplementedError

    def after(self, i: int) -> None:
        pass


def time_interleaved(
    tasks: list[Timed],
    *,
    min_reps: int,
    max_reps: int | None = None,
    min_time: float = 0.0,
    n_sets: int = 1,
    warmup: int = 0,
    order: str = "shuffle",
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
    on_rep: Callable[[int], None] | None = None,
) -> dict[Hashable, list[float]]:
    """Times of every task in seconds of `clock`, interleaved rep after rep.

    Every task runs at least `min_reps` times; after that a task keeps its place in the
    reps until its timed runs add up to its share of `min_time` (min_time / number of
    tasks) or it reaches `max_reps` (default `min_reps`), so cheap tasks collect more
    samples while an expensive one does not stretch the run. Rep r runs on input set
    r % n_sets. `order="shuffle"` draws each rep's order from a fixed seed (no task
    keeps a fixed neighbour when tasks drop out at different reps); `"rotate"` shifts
    it by one each rep, so in a fixed number of reps every task takes every place
    equally often. `sync` (a GPU's synchronize) runs before the clock starts and
    before it stops. Up to `warmup` untimed calls each on set 0 keep first-call costs
    (op registration, allocator growth, the extension's build) out of the samples; a
    call over 0.5 s has paid them, so warm-up stops there.
    """
    max_reps = min_reps if max_reps is None else max_reps
    for task in tasks:
        for _ in range(warmup):
            task.before(0)
            t0 = time.perf_counter()
            task.run(0)
            task.after(0)
            if time.perf_counter() - t0 >= 0.5:
                break
    samples = {task.key: [] for task in tasks}
    share = min_time / len(tasks)
    rng = random.Random(0)
    rep = 0
    while True:
        if rep < min_reps:
            todo = list(tasks)
        else:
            todo = [
                t for t in tasks if sum(samples[t.key]) < share and len(samples[t.key]) < max_reps
            ]
        if not todo:
            break
        if order == "shuffle":
            rng.shuffle(todo)
        else:
            todo = todo[rep % len(todo) :] + todo[: rep % len(todo)]
        i = rep % n_sets
        # Collected between reps, not inside a timed run.
        gc.collect()
        gc.disable()
        try:
            for task in todo:
                task.before(i)
                if sync is not None:
                    sync()
                t0 = clock()
                task.run(i)
                if sync is not None:
                    sync()
                samples[task.key].append(clock() - t0)
                task.after(i)
        finally:
            gc.enable()
        rep += 1
        if on_rep is not None:
            on_rep(rep)
    return samples


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list."""
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(values: list[float], scale: float = 1.0) -> tuple[float, float, float]:
    """(median, p20, p80) of `values`, each times `scale` (1e3: seconds to ms)."""
    ordered = sorted(scale * v for v in values)
    return quantile(ordered, 0.5), quantile(ordered, 0.2), quantile(ordered, 0.8)


# ---------------------------------------------------------------------------------------
# Results: CSV upsert


def _sort_key(row: dict) -> tuple:
    """Group rows by device, threads and shape; numbers compare as numbers."""

    def part(value):
        try:
            return (0, float(value), "")
        except (TypeError, ValueError):
            return (1, 0.0, str(value))

    order = ("device", "threads", "size", "layer", "dtype", "M", "K", "N", "R", "rank")
    order += ("p", "dropout", "provider", "mode")
    return tuple(part(row.get(k, "")) for k in order)


def upsert_csv(path: Path, rows: list[dict], key: tuple, columns: tuple) -> None:
    """Replace the rows of `path` with the same `key` columns, append the rest."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def row_key(r):
        return tuple(str(r[k]) for k in key)

    merged = {}
    if path.exists():
        with path.open(newline="") as f:
            for r in csv.DictReader(f):
                merged[row_key(r)] = r
    for r in rows:
        out = {}
        for k in columns:
            v = r.get(k, "")
            out[k] = f"{v:.6g}" if isinstance(v, float) else v
        merged[row_key(out)] = out
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(merged.values(), key=_sort_key))
