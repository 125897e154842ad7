"""QLoRA under DDP and FSDP2 on two CPU processes (gloo, loopback): bitsandbytes 4-bit
bases (nf4, double quantization, packed bytes in a bf16 `quant_storage`, FSDP1's
setting) with float32 adapters: lora_kernels' `LoRALinear`, and a minimal LoRA of the
test's own that calls `Linear4bit.forward` (bitsandbytes' own path).

Each 4-bit layer, as it runs, sees the packed bytes and the quant state it was built
with, bit for bit (so its dequantized weight is bit-identical too), and the mean loss
and the adapter gradients of the two ranks equal those of one process on the
concatenated batch. FSDP2 runs after `prepare_4bit_for_fsdp`, also under a
`MixedPrecisionPolicy` whose float32 `param_dtype` would otherwise cast the packed
bytes as numbers. On the CPU FSDP2's copies move bits, so the CUDA-only corruption that
`lora_kernels.distributed` describes (NaN patterns canonicalized) cannot show here.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from helpers import FP32_TOL, rel_error
from torch import nn
from two_processes import WORLD_SIZE, run_two_processes

import lora_kernels
from lora_kernels import prepare_4bit_for_fsdp

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")

if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)


ROWS = 6  # per rank
WIDTH, HIDDEN = 40, 72  # 2880 codes per layer: 45 quant blocks of 64
TIMEOUT_S = 150
STORAGE = torch.bfloat16


class MiniLoRA(nn.Module):
    """base(x) + s (x A^T) B^T around a frozen Linear4bit: the test's own LoRA, no kernel."""

    def __init__(self, base: nn.Module, rank: int = 4, alpha: float = 8.0):
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        K, N = base.in_features, base.out_features
        self.lora_A = nn.Parameter(torch.randn(rank, K) * K**-0.5)
        self.lora_B = nn.Parameter(torch.randn(N, rank) * 0.3)

    def forward(self, x):
        return self.base(x) + self.scaling * (x @ self.lora_A.t()) @ self.lora_B.t()


def linear4bit(K: int, N: int, bias: bool) -> nn.Module:
    """A Linear4bit quantized on the CPU (bitsandbytes quantizes it as it moves)."""
    layer = bnb.nn.Linear4bit(
        K,
        N,
        bias=bias,
        compute_dtype=torch.float32,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=STORAGE,
    )
    return layer.to("cpu")


def lora_around(base: nn.Module, kind: str) -> nn.Module:
    """The LoRA layer of `kind` around a quantized Linear4bit, B random (so that A gets
    a gradient): "mini", the test's own, or "lora_kernels", `LoRALinear`."""
    if kind == "mini":
        return MiniLoRA(base)
    layer = lora_kernels.LoRALinear(base, rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
    return layer


# The attribute of each kind's LoRA layer that holds the 4-bit base.
BASE_ATTRIBUTE = {"mini": "base", "lora_kernels": "original_linear"}
LORA_KINDS = tuple(BASE_ATTRIBUTE)


class Block(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = lora_around(linear4bit(WIDTH, HIDDEN, bias=True), kind)
        self.down = lora_around(linear4bit(HIDDEN, WIDTH, bias=False), kind)

    def forward(self, h):
        return h + self.down(torch.relu(self.up(self.norm(h))))


class Net(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.blocks = nn.ModuleList([Block(kind), Block(kind)])
        self.head = nn.Linear(WIDTH, 4)

    def forward(self, h):
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def build_model(kind: str) -> nn.Module:
    """The same model in every process: seeded, 4-bit bases, only the adapters trainable."""
    torch.manual_seed(0)
    model = Net(kind)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("lora_A", "lora_B")))
    return model


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD_SIZE * ROWS, 5, WIDTH, generator=g)
    y = torch.randn(WORLD_SIZE * ROWS, 5, 4, generator=g)
    return x, y


def loss_fn(out, y):
    return (out - y).square().mean()


def layers_4bit(model) -> dict[str, nn.Module]:
    return {
        name.removeprefix("module."): m
        for name, m in model.named_modules()
        if isinstance(m, bnb.nn.Linear4bit)
    }


def packed_bytes(weight, numel: int) -> torch.Tensor:
    """The ceil(numel / 2) packed bytes of a 4-bit weight, whatever its storage dtype."""
    if hasattr(weight, "full_tensor"):  # FSDP2's sharded DTensor
        weight = weight.full_tensor()
    return weight.detach().reshape(-1).view(torch.uint8)[: (numel + 1) // 2].clone()


def quant_state_tensors(qs) -> dict[str, torch.Tensor]:
    tensors = {"absmax": qs.absmax, "code": qs.code, "offset": qs.offset}
    tensors |= {"absmax2": qs.state2.absmax, "code2": qs.state2.code}
    return {k: v.detach().reshape(-1).clone() for k, v in tensors.items()}


def record_what_layers_see(model, kind: str) -> dict[str, dict]:
    """After each LoRA layer's forward: the packed bytes and quant state its 4-bit base
    ran with, and the bits of the dense weight they dequantize to (overwritten at each
    call). Read from the LoRA layer, as a LoRA layer may read its base's weight without
    calling the base."""
    seen: dict[str, dict] = {}
    attribute = BASE_ATTRIBUTE[kind]

    def hook(name):
        def record(module, args, output):
            weight = getattr(module, attribute).weight  # the quant state re-attached
            qs = weight.quant_state
            numel = qs.shape.numel()
            seen[name] = {
                "packed": packed_bytes(weight, numel),
                "quant_state": quant_state_tensors(qs),
                "dense_bits": lora_kernels.dequantize_4bit(weight).view(torch.int32).clone(),
            }

        return record

    for name, module in model.named_modules():
        if isinstance(getattr(module, attribute, None), bnb.nn.Linear4bit):
            module.register_forward_hook(hook(f"{name.removeprefix('module.')}.{attribute}"))
    return seen


def lora_grads(model) -> dict[str, torch.Tensor]:
    grads = {}
    for name, p in model.named_parameters():
        if name.endswith(("lora_A", "lora_B")):
            grad = p.grad
            if hasattr(grad, "full_tensor"):
                grad = grad.full_tensor()
            grads[name.removeprefix("module.")] = grad.detach().clone()
    return grads


def shard(model: nn.Module, engine: str) -> nn.Module:
    """DDP; or FSDP2 (one fully_shard per block and one for the root, after
    prepare_4bit_for_fsdp), "fsdp2-mp" with a float32 MixedPrecisionPolicy."""
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if engine == "fsdp2-mp":
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.float32, reduce_dtype=torch.float32
        )
    assert sorted(prepare_4bit_for_fsdp(model)) == sorted(layers_4bit(model))
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def train_step(model, kind: str, x, y) -> dict:
    seen = record_what_layers_see(model, kind)
    loss = loss_fn(model(x), y)
    loss.backward()
    return {"loss": loss.detach(), "seen": seen, "grads": lora_grads(model)}


def _ranks_work(rank: int, out_dir: str, runs: tuple[tuple[str, str], ...]) -> dict:
    x, y = full_batch()
    rows = slice(rank * ROWS, (rank + 1) * ROWS)
    results = {}
    for kind, engine in runs:
        wrapped = shard(build_model(kind), engine)
        result = train_step(wrapped, kind, x[rows], y[rows])
        # The loss of the whole batch: the mean of the ranks' (equal-sized) halves.
        loss = result["loss"].clone()
        dist.all_reduce(loss)
        result["mean_loss"] = loss / WORLD_SIZE
        # What each layer stores between steps, gathered (a collective).
        result["stored"] = {
            name: packed_bytes(layer.weight, layer.quant_state.shape.numel())
            for name, layer in layers_4bit(wrapped).items()
        }
        if engine != "ddp":
            try:
                prepare_4bit_for_fsdp(wrapped)
            except ValueError as error:
                result["prepare_after_shard"] = str(error)
        results[kind, engine] = result
    return results


@functools.cache
def reference(kind: str) -> dict:
    """One process on the concatenated batch, with what each 4-bit layer was built with."""
    model = build_model(kind)
    built = {
        name: {
            "packed": packed_bytes(layer.weight, layer.quant_state.shape.numel()),
            "quant_state": quant_state_tensors(layer.quant_state),
        }
        for name, layer in layers_4bit(model).items()
    }
    x, y = full_batch()
    return {"built": built, **train_step(model, kind, x, y)}


def check_against_reference(results: list[dict], kind: str, engine: str) -> None:
    expected = reference(kind)
    built = expected["built"]
    assert len(built) == 4
    # The packed weights hold the NaN bit patterns a float copy could canonicalize.
    nans = sum(int(torch.isnan(b["packed"].view(STORAGE)).sum()) for b in built.values())
    assert nans > 0
    for rank, result in enumerate(r[kind, engine] for r in results):
        where = f"{kind} LoRA, {engine}, rank {rank}"
        assert sorted(result["seen"]) == sorted(built), where
        for name, layer in built.items():
            seen = result["seen"][name]
            assert torch.equal(seen["packed"], layer["packed"]), f"{where} {name}: packed"
            assert torch.equal(result["stored"][name], layer["packed"]), f"{where} {name}"
            for key, tensor in layer["quant_state"].items():
                got = seen["quant_state"][key]
                assert got.dtype == tensor.dtype, (where, name, key)
                same_bits = torch.equal(got.view(torch.uint8), tensor.view(torch.uint8))
                assert same_bits, f"{where} {name}: quant_state {key}"
            dense = expected["seen"][name]["dense_bits"]
            assert torch.equal(seen["dense_bits"], dense), f"{where} {name}: dequantized"
        if engine != "ddp":
            assert "call it before fully_shard" in result.get("prepare_after_shard", ""), where
        err = rel_error(result["mean_loss"], expected["loss"])
        assert err <= FP32_TOL, f"{where}: loss rel err {err:.2e}"
        assert sorted(result["grads"]) == sorted(expected["grads"]), where
        assert len(result["grads"]) == 8
        for name, grad in result["grads"].items():
            assert grad.dtype == torch.float32, (where, name)
            err = rel_error(grad, expected["grads"][name])
            assert err <= FP32_TOL, f"{where} {name}: grad rel err {err:.2e}"


def test_ddp_with_4bit_bases_matches_one_process(tmp_path):
    runs = tuple((kind, "ddp") for kind in LORA_KINDS)
    results = run_two_processes(_ranks_work, (runs,), tmp_path, TIMEOUT_S)
    for kind, engine in runs:
        check_against_reference(results, kind, engine)


def test_fsdp2_with_4bit_bases_matches_one_process(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as error:
        pytest.skip(f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {error}")
    runs = tuple((kind, engine) for kind in LORA_KINDS for engine in ("fsdp2", "fsdp2-mp"))
    results = run_two_processes(_ranks_work, (runs,), tmp_path, TIMEOUT_S)
    for kind, engine in runs:
        check_against_reference(results, kind, engine)


# ---------------------------------------------------------------------------------------
# prepare_4bit_for_fsdp in one process
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "K, N, storage",
    [(12, 6, torch.float32), (40, 72, torch.float16), (40, 72, torch.uint8)],
    ids=["K12-N6-fp32-storage", "K40-N72-fp16-storage", "K40-N72-u8"],
)
def test_prepare_restores_the_packed_bytes_as_uint8_and_sets_the_layer_quant_state(K, N, storage):
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(K, N, compute_dtype=torch.float32, quant_storage=storage)
    model = nn.Sequential(MiniLoRA(layer.to("cpu")))
    weight, x = layer.weight, torch.randn(3, K)
    numel, quant_state = N * K, weight.quant_state
    before = packed_bytes(weight, numel), bnb.functional.dequantize_4bit(weight, quant_state)
    y = model(x)
    layer.quant_state = None  # what a layer quantized elsewhere may lack

    assert prepare_4bit_for_fsdp(model) == ["0.base"]
    assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.dtype == torch.uint8
    assert layer.weight.shape == ((numel + 1) // 2, 1)
    assert torch.equal(packed_bytes(layer.weight, numel), before[0])
    assert layer.quant_state is quant_state and layer.weight.quant_state is quant_state
    assert layer.quant_storage == torch.uint8
    dense = lora_kernels.dequantize_4bit(layer.weight)
    assert torch.equal(dense.view(torch.int32), before[1].view(torch.int32))
    assert torch.equal(model(x), y)
    assert prepare_4bit_for_fsdp(model) == ["0.base"]  # a second call changes nothing
    assert torch.equal(packed_bytes(layer.weight, numel), before[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_foreach_copy_on_cuda_moves_uint8_packed_bytes_bit_for_bit():
    """What prepare_4bit_for_fsdp relies on: FSDP2's all-gather copy-in, a
    `_foreach_copy_`, copies uint8 bytes as they are, every byte value (bf16 NaN
    patterns included, which a bf16 copy may rewrite)."""
    packed = torch.arange(65536, dtype=torch.int32, device="cuda").to(torch.uint16)
    packed = packed.view(torch.uint8)  # every byte pair, so every bf16 pattern
    dst = torch.zeros_like(packed)
    torch._foreach_copy_([dst], [packed])
    assert torch.equal(dst, packed)


def test_prepare_refuses_a_4bit_weight_that_is_not_quantized_yet():
    model = nn.Sequential(bnb.nn.Linear4bit(8, 4, quant_storage=torch.bfloat16))
    with pytest.raises(ValueError, match=r"weight of 0 is not quantized yet .*move the model"):
        prepare_4bit_for_fsdp(model)
