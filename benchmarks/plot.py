#!/usr/bin/env python
"""PNG plots drawn from a benchmark CSV (benchmarks/results/<device>.csv).

- <stem>_speedup_<mode>.png: per shape, each provider's speed relative to the frozen
  nn.Linear floor (floor time / provider time, 1.0 = as fast as no LoRA) and relative
  to peft (peft time / provider time, above 1.0 = faster than peft);
- <stem>_saved_bytes.png: per shape, activation bytes saved for backward over bytes(X).

    python benchmarks/plot.py benchmarks/results/<device>.csv [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

PROVIDER_ORDER = ("linear", "peft", "unsloth", "lk-torch", "lk-cpu", "lk-cuda", "lk-triton")


def _shape_label(r: dict) -> str:
    return f"{r['layer']} M={r['M']}\nR={r['R']} p={float(r['p']):g} {r['dtype']}"


def _read(path: Path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _providers(rows):
    seen = {r["provider"] for r in rows}
    ordered = [p for p in PROVIDER_ORDER if p in seen]
    return ordered + sorted(seen - set(ordered))


def _color(provider: str):
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    known = list(PROVIDER_ORDER)
    index = known.index(provider) if provider in known else len(known) + hash(provider) % 3
    return cycle[index % len(cycle)]


def _grouped_bars(ax, shapes, providers, value, title, ylabel, ref_line=None):
    """One group of bars per shape, one bar per provider (a fixed colour each)."""
    import numpy as np

    width = 0.8 / max(1, len(providers))
    xs = np.arange(len(shapes))
    for j, provider in enumerate(providers):
        heights = [value(shape, provider) for shape in shapes]
        offset = (j - (len(providers) - 1) / 2) * width
        ax.bar(xs + offset, heights, width, label=provider, color=_color(provider))
    if ref_line is not None:
        ax.axhline(ref_line, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(xs)
    ax.set_xticklabels(shapes, fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)


def plot_csv(csv_path: Path, out_dir: Path | None = None) -> list[Path]:
    """Draw the plots for every device in the CSV; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    out_dir = Path(out_dir or csv_path.parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _read(csv_path)
    written = []
    if not rows:
        return written
    device = rows[0]["device"]
    providers = _providers(rows)
    shapes = list(dict.fromkeys(_shape_label(r) for r in rows))
    by = {(_shape_label(r), r["provider"], r["mode"]): r for r in rows}
    nan = float("nan")

    def ratio(shape, provider, mode, column):
        r = by.get((shape, provider, mode))
        if r is None or not r[column]:
            return nan
        v = float(r[column])
        return 1.0 / v if v else nan

    for mode in ("fwd", "bwd", "fwd+bwd"):
        if not any(k[2] == mode for k in by):
            continue
        fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(shapes)), 8))
        _grouped_bars(
            axes[0],
            shapes,
            providers,
            lambda s, p, mode=mode: ratio(s, p, mode, "vs_floor"),
            f"{mode}: speed vs frozen nn.Linear (floor time / provider time; 1 = no LoRA cost)",
            "x floor",
            ref_line=1.0,
        )
        _grouped_bars(
            axes[1],
            shapes,
            [p for p in providers if p != "linear"],
            lambda s, p, mode=mode: ratio(s, p, mode, "vs_peft"),
            f"{mode}: speedup vs peft lora.Linear (peft time / provider time)",
            "x peft",
            ref_line=1.0,
        )
        for ax in axes:
            ax.legend(fontsize=7, ncol=len(providers))
        fig.suptitle(f"lora_linear on {device} (measured; ratios from the same run)")
        fig.tight_layout()
        path = out_dir / f"{csv_path.stem}_speedup_{mode.replace('+', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(shapes)), 4.5))

    def saved(shape, provider):
        for mode in ("fwd+bwd", "fwd", "bwd"):
            r = by.get((shape, provider, mode))
            if r is not None and r["saved_vs_x"]:
                return float(r["saved_vs_x"])
        return nan

    _grouped_bars(
        ax,
        shapes,
        providers,
        saved,
        f"activation bytes saved for backward / bytes(X) on {device} (parameters excluded)",
        "x bytes(X)",
    )
    ax.legend(fontsize=7, ncol=len(providers))
    fig.tight_layout()
    path = out_dir / f"{csv_path.stem}_saved_bytes.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description="Plots from a benchmark CSV")
    ap.add_argument("csv", type=Path)
    ap.add_argument("--out", type=Path, help="output folder (default: beside the CSV)")
    args = ap.parse_args()
    for path in plot_csv(args.csv, args.out):
        print(path)


if __name__ == "__main__":
    main()
