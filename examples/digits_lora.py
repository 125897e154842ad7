#!/usr/bin/env python
"""LoRA on scikit-learn's 8x8 digits: learn two new classes with a few adapter weights.

The seed tutorial's experiment on data that ships with scikit-learn (no download):

1. train a small MLP on the digits 0-7 only (its output layer has 10 logits, but 8
   and 9 never appear, so it never predicts them);
2. freeze it, put LoRA adapters on every linear layer with `lora_kernels.apply_lora`,
   and fine-tune only the adapters on the digits 8 and 9, once with init="svd"
   (PiSSA: A and B from the top singular triplets of W, the frozen weight replaced by
   the residual) and once with the default init ("kaiming": B = 0);
3. print the base accuracy on 0-7, the base accuracy on 8-9 before fine-tuning, the
   accuracy on 8-9 after, and the share of parameters that trained.

The fine-tuning data holds only 8s and 9s, so the adapted model forgets 0-7 (printed
too): the adapter learns the new task; it is not a continual-learning recipe.
`lora_kernels.remove_lora` or `lora_disabled` gets the base model back.

    python examples/digits_lora.py            # < 1 minute on a CPU
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

try:
    import lora_kernels
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lora_kernels


def load_data(seed: int):
    """Train/test tensors of the 8x8 digits, pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.3, random_state=seed, stratify=y
    )

    def tensors(X, y):
        return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)

    return tensors(X_train, y_train), tensors(X_test, y_test)


def subset(data, classes):
    X, y = data
    keep = torch.isin(y, torch.tensor(classes))
    return X[keep], y[keep]


def make_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def fit(model, data, epochs, lr, seed, batch) -> None:
    """Adam on the trainable parameters, shuffled minibatches, cross-entropy."""
    X, y = data
    g = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=g)
        for i in range(0, len(X), batch):
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


@torch.no_grad()
def accuracy(model, data) -> float:
    X, y = data
    model.eval()
    return float((model(X).argmax(-1) == y).float().mean())


def run(rank=8, alpha=16.0, base_epochs=30, lora_epochs=30, lr=1e-2, lora_lr=1e-2, seed=0) -> dict:
    """The whole experiment; returns the printed numbers (used by the tests)."""
    torch.manual_seed(seed)
    train, test = load_data(seed)
    old, new = list(range(8)), [8, 9]

    base = make_mlp()
    fit(base, subset(train, old), base_epochs, lr, seed, batch=128)
    results = {
        "base_acc_0_7": accuracy(base, subset(test, old)),
        "base_acc_8_9": accuracy(base, subset(test, new)),
    }
    for init in ("svd", "kaiming"):
        model = copy.deepcopy(base)
        torch.manual_seed(seed + 1)
        lora_kernels.apply_lora(model, rank=rank, alpha=alpha, init=init)
        trainable, total = lora_kernels.count_parameters(model)
        before = accuracy(model, subset(test, new))
        fit(model, subset(train, new), lora_epochs, lora_lr, seed + 2, batch=32)
        results[init] = {
            "acc_8_9_before": before,
            "acc_8_9_after": accuracy(model, subset(test, new)),
            "acc_0_7_after": accuracy(model, subset(test, old)),
            "trainable": trainable,
            "total": total,
            "trainable_share": trainable / total,
        }
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="LoRA fine-tuning on the sklearn digits")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--base-epochs", type=int, default=30)
    ap.add_argument("--lora-epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    start = time.perf_counter()
    r = run(args.rank, args.alpha, args.base_epochs, args.lora_epochs, seed=args.seed)
    print("MLP 64-128-64-10 trained on digits 0-7 (scikit-learn 8x8 digits, 30% held out)")
    print(f"  base accuracy on 0-7:                     {r['base_acc_0_7']:.3f}")
    print(f"  base accuracy on 8-9 (before fine-tuning): {r['base_acc_8_9']:.3f}")
    print(f"LoRA rank {args.rank}, alpha {args.alpha:g} on every linear layer, fine-tuned on 8-9:")
    for init in ("svd", "kaiming"):
        s = r[init]
        label = "init='svd'" if init == "svd" else "init='kaiming' (default)"
        print(
            f"  {label:25s} accuracy on 8-9 after: {s['acc_8_9_after']:.3f}   "
            f"(before: {s['acc_8_9_before']:.3f}; on 0-7 after: {s['acc_0_7_after']:.3f}); "
            f"trainable {s['trainable']} of {s['total']} parameters "
            f"({100 * s['trainable_share']:.1f}%)"
        )
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
