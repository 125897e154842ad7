"""DDP and FSDP2 over two CPU processes (gloo, loopback): the LoRA gradients equal those of
one process on the concatenated batch; only the adapters train, the frozen base gets no
gradient; adapters of a sharded model save in peft's format."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import FP32_TOL, rel_error
from torch import nn
from two_processes import WORLD_SIZE, run_two_processes

from lora_kernels import apply_lora, load_adapter, lora_layers, save_adapter

ROWS = 6  # per rank
P = 0.1
TIMEOUT_S = 90
# bf16 activations: each row is computed alike in both runs (measured 1.3e-7 here), but
# a BLAS may pick other bf16 kernels for another number of rows.
BF16_TOL = 1e-3

if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)


class Block(nn.Module):
    def __init__(self, width=16, hidden=32):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, h):
        return h + self.down(torch.relu(self.up(self.norm(h))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 4)

    def forward(self, h):
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def build_model(dtype=torch.float32) -> nn.Module:
    """The same model in every process: seeded base, adapters with a random B (float32
    adapters on a bfloat16 base)."""
    torch.manual_seed(0)
    model = Net().to(dtype)
    apply_lora(model, rank=4, alpha=8, target_modules=["up", "down"])
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.3)
    return model


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD_SIZE * ROWS, 5, 16, generator=g)
    y = torch.randn(WORLD_SIZE * ROWS, 5, 4, generator=g)
    return x, y


def loss_fn(out, y):
    return (out - y).square().mean()


def set_dropout(model, p):
    for _, layer in lora_layers(model):
        layer.dropout = p


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        if name.endswith("lora_A") or name.endswith("lora_B"):
            grad = p.grad
            if hasattr(grad, "full_tensor"):  # FSDP2: a sharded DTensor
                grad = grad.full_tensor()
            grads[name.removeprefix("module.")] = grad.detach().clone()
    return grads


def frozen_report(model) -> dict[str, tuple[bool, bool, str]]:
    """name -> (requires_grad, has grad, tensor type) for every non-LoRA parameter."""
    return {
        name.removeprefix("module."): (p.requires_grad, p.grad is not None, type(p.data).__name__)
        for name, p in model.named_parameters()
        if not (name.endswith("lora_A") or name.endswith("lora_B"))
    }


def shard(model: nn.Module, engine: str) -> nn.Module:
    """DDP, or FSDP2 with one fully_shard per block and one for the root."""
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _ranks_work(rank: int, out_dir: str, engine: str) -> dict:
    model = build_model()
    wrapped = shard(model, engine)
    x, y = full_batch()
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    result = {}

    # 1. p = 0: the gradients of one process on the whole batch.
    loss_fn(wrapped(x[rows]), y[rows]).backward()
    result["grads_p0"] = lora_grads(wrapped)
    result["frozen"] = frozen_report(wrapped)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    # Every rank takes part in gathering the (sharded) adapters; rank 0 writes.
    # (The DDP wrapper itself: save_adapter looks through it to peft's names.)
    save_adapter(wrapped, f"{out_dir}/adapter" if rank == 0 else f"{out_dir}/not-written")

    # 2. p > 0: each rank draws its seed from the same default generator state.
    set_dropout(model, P)
    torch.manual_seed(100)
    loss_fn(wrapped(x[rows]), y[rows]).backward()
    result["grads_p"] = lora_grads(wrapped)

    # 3. A bfloat16 base with float32 adapters (the usual set-up), p = 0.
    wrapped = shard(build_model(torch.bfloat16), engine)
    loss_fn(wrapped(x[rows].bfloat16()).float(), y[rows]).backward()
    result["grads_bf16"] = lora_grads(wrapped)
    return result


def single_process_reference() -> dict:
    """What the two ranks together must reproduce, computed in one process."""
    model = build_model()
    x, y = full_batch()
    loss_fn(model(x), y).backward()
    reference = {"grads_p0": lora_grads(model)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    reference["adapters"] = {
        name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
        for name, layer in lora_layers(model)
    }
    # With dropout the mask depends on the seed and the rows of the call, so the
    # reference runs each rank's half with that rank's seed and averages, as DDP does.
    set_dropout(model, P)
    for rank in range(WORLD_SIZE):
        rows = slice(rank * ROWS, (rank + 1) * ROWS)
        torch.manual_seed(100)
        (loss_fn(model(x[rows]), y[rows]) / WORLD_SIZE).backward()
    reference["grads_p"] = lora_grads(model)
    model = build_model(torch.bfloat16)
    loss_fn(model(x.bfloat16()).float(), y).backward()
    reference["grads_bf16"] = lora_grads(model)
    return reference


def check_against_reference(results, reference, tmp_path, sharded: bool):
    for rank, result in enumerate(results):
        for key, tol in (("grads_p0", FP32_TOL), ("grads_p", FP32_TOL), ("grads_bf16", BF16_TOL)):
            grads = result[key]
            assert sorted(grads) == sorted(reference[key]) and len(grads) == 8
            for name, grad in grads.items():
                assert grad.dtype == torch.float32, (rank, key, name, grad.dtype)
                err = rel_error(grad, reference[key][name])
                assert err <= tol, f"rank {rank} {key} {name}: rel err {err:.2e}"
        # The frozen base: no gradient, not trainable; sharded (DTensor) under FSDP2.
        assert len(result["frozen"]) == 2 * 5 + 2
        for name, (requires_grad, has_grad, kind) in result["frozen"].items():
            assert not requires_grad and not has_grad, (rank, name)
            assert (kind == "DTensor") == sharded, (rank, name, kind)
    # The adapters after one AdamW step, gathered and written by rank 0 only.
    assert not (tmp_path / "not-written").exists()
    loaded = dict(lora_layers(load_adapter(Net(), tmp_path / "adapter")))
    assert sorted(loaded) == sorted(reference["adapters"])
    for name, (A, B) in reference["adapters"].items():
        assert rel_error(loaded[name].lora_A.detach(), A) <= FP32_TOL, name
        assert rel_error(loaded[name].lora_B.detach(), B) <= FP32_TOL, name


def test_ddp_two_processes_match_one_process(tmp_path):
    results = run_two_processes(_ranks_work, ("ddp",), tmp_path, TIMEOUT_S)
    check_against_reference(results, single_process_reference(), tmp_path, sharded=False)


def test_fsdp2_two_processes_match_one_process(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        pytest.skip(f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {error}")
    results = run_two_processes(_ranks_work, ("fsdp2",), tmp_path, TIMEOUT_S)
    check_against_reference(results, single_process_reference(), tmp_path, sharded=True)
