"""The providers of the kernel benchmark and what is measured on each besides time.

Every provider is a function of x built on one `InputSet` (x, dY, W, b, A, B shared by
all providers, so they compute on identical values); a `Task` is one (provider, mode)
for `harness.time_interleaved` or `do_bench`. Besides time: the activation bytes
saved for backward, the GPU peak of one fwd+bwd, and the output checked against the
float64 reference.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from harness import Timed
from torch import nn

import lora_kernels
from lora_kernels.backends import resolve_backend
from lora_kernels.memory import saved_activations
from lora_kernels.reference import (
    dora_linear_reference,
    dora_weight_norm_reference,
    lora_linear_reference,
)

LORA_ALPHA = 16.0


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


def build_peft_layer(weight, bias, lora_A, lora_B, R, alpha, p, use_dora=False) -> nn.Module:
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
    config = LoraConfig(
        r=R, lora_alpha=alpha, lora_dropout=p, target_modules=["proj"], use_dora=use_dora
    )
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
    magnitude: nn.Parameter | None = None  # DoRA's m [N], when a DoRA provider runs
    fns: dict = field(default_factory=dict)

    def params(self) -> list[torch.Tensor]:
        tensors = (self.weight, self.bias, self.lora_A, self.lora_B, self.magnitude)
        return [t for t in tensors if t is not None]

    def grads_to_none(self) -> list[torch.Tensor]:
        extra = [self.magnitude] if self.magnitude is not None else []
        return [self.x, self.lora_A, self.lora_B, *extra]


def make_input_set(cfg, device, adapter_dtype, bias, providers, seed) -> InputSet:
    """Random x, dY, W (frozen), b, A, B of `cfg`'s shape and each provider at `cfg.p`."""
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
    s = InputSet(x, dy, weight, b, lora_A, lora_B)
    if any(is_dora(name) for name in providers):
        s.magnitude = random_magnitude(s, g)
    s.fns = {name: provider_fn(name, s, cfg.p) for name in providers}
    return s


def provider_fn(name: str, s: InputSet, p: float):
    """Provider `name` as a function of x on the tensors of `s`, at dropout `p`."""
    w, b, A, B = s.weight, s.bias, s.lora_A, s.lora_B
    R = A.shape[0]
    scale = LORA_ALPHA / R
    if name == "linear":
        return lambda x: torch.nn.functional.linear(x, w, b)
    if name == "peft":
        return build_peft_layer(w, b, A, B, R, LORA_ALPHA, p)
    if name == "unsloth":

        def unsloth(x):
            out = torch.nn.functional.linear(x, w, b)
            xa = x @ A.t().to(x.dtype)
            return out.addmm_(xa, B.t().to(x.dtype), alpha=scale)

        return unsloth
    if is_dora(name):
        return dora_provider_fn(name, s, p)
    backend = name.removeprefix("lk-")

    def lk(x):
        return lora_kernels.lora_linear(
            x, w, b, A, B, scale, dropout_p=p, training=True, backend=backend
        )

    return lk


@dataclass
class Task(Timed):
    """One (provider, mode) to time; `run(i)` does one call on input set i.

    `key` names its samples: (provider, mode) unless given.
    """

    provider: str
    mode: str
    sets: list[InputSet]
    key: object = None
    graphs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.key is None:
            self.key = (self.provider, self.mode)

    def prepare(self) -> None:
        if self.mode == "bwd":
            self.graphs = [s.fns[self.provider](s.x) for s in self.sets]

    def before(self, i: int) -> None:
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


# ---------------------------------------------------------------------------------------
# DoRA providers: peft's `use_dora=True` layer and `lora_kernels.dora_linear`


def is_dora(name: str) -> bool:
    """'peft-dora' or 'lk-dora-<backend>'."""
    return name == "peft-dora" or name.startswith("lk-dora-")


def provider_backend(name: str) -> str:
    """The lora_kernels backend of an 'lk-...' provider, else ''."""
    return name.removeprefix("lk-dora-").removeprefix("lk-") if name.startswith("lk-") else ""


def random_magnitude(s: InputSet, g: torch.Generator) -> nn.Parameter:
    """m [N] in the adapters' dtype: the row norms of W + s B A times a factor in
    [0.5, 1.5), so that m/n is far from 1."""
    scale = LORA_ALPHA / s.lora_A.shape[0]
    n = dora_weight_norm_reference(s.weight, s.lora_A, s.lora_B, scale)
    factor = 0.5 + torch.rand(n.shape, generator=g).to(n.device)
    return nn.Parameter((n * factor).to(s.lora_A.dtype))


def dora_provider_fn(name: str, s: InputSet, p: float):
    w, b, A, B, m = s.weight, s.bias, s.lora_A, s.lora_B, s.magnitude
    R = A.shape[0]
    if name == "peft-dora":
        layer = build_peft_layer(w, b, A, B, R, LORA_ALPHA, p, use_dora=True)
        layer.lora_magnitude_vector["default"].weight = m
        return layer
    backend = provider_backend(name)
    cache = lora_kernels.dora.WeightNormCache()  # as LoRALinear(use_dora=True) holds one

    def lk_dora(x):
        return lora_kernels.dora_linear(
            x, w, b, A, B, m, LORA_ALPHA / R, p, training=True, backend=backend, norm_cache=cache
        )

    return lk_dora


def dora_reference_output(s: InputSet, cfg) -> torch.Tensor:
    """DoRA's output at p = 0 in float64 from the tensors of `s`."""

    def up(t):
        return None if t is None else t.detach().double()

    return dora_linear_reference(
        up(s.x),
        up(s.weight),
        up(s.bias),
        up(s.lora_A),
        up(s.lora_B),
        up(s.magnitude),
        LORA_ALPHA / cfg.R,
        0.0,
    )


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


def check_output(s: InputSet, provider: str, cfg) -> str:
    """Relative error of the forward output against the float64 reference (p = 0 only)."""
    if cfg.p > 0:
        return "-"
    with torch.no_grad():
        y = s.fns[provider](s.x).double()
        if is_dora(provider):
            ref = dora_reference_output(s, cfg)
        elif provider == "linear":
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
# QLoRA: a bitsandbytes 4-bit base (bench_lora_linear.py --qlora)
# ---------------------------------------------------------------------------------------

# The frozen Linear4bit alone is the floor; peft's lora.bnb.Linear4bit the baseline,
# with use_dora=True for the DoRA rows (QDoRA).
QLORA_FLOOR, QLORA_PEFT, QDORA_PEFT = "linear4bit", "peft-bnb", "peft-bnb-dora"


def qlora_baseline(provider: str) -> str:
    """peft's provider of the same variant: peft-bnb-dora for DoRA rows, else peft-bnb."""
    return QDORA_PEFT if "dora" in provider else QLORA_PEFT


def make_qlora_set(M, K, N, R, p, device, backends, seed=0) -> InputSet:
    """x, dY, a frozen nf4 Linear4bit (double quant, float32 compute) of a random [N, K]
    weight, shared A, B and DoRA magnitude, and the providers on them: the Linear4bit
    alone, peft's 4-bit LoRA layer and LoRALinear on each of `backends`, then the same
    two with DoRA (`peft-bnb-dora`, `lk-dora-<backend>`)."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    g = torch.Generator(device="cpu").manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    base = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.float32, device="meta")
    base.weight = bnb.nn.Params4bit(
        rand(N, K, scale=K**-0.5), requires_grad=False, compress_statistics=True, quant_type="nf4"
    ).to(device)
    base.train()
    x = rand(M, K).requires_grad_()
    lora_A = nn.Parameter(rand(R, K, scale=K**-0.5))
    lora_B = nn.Parameter(rand(N, R, scale=R**-0.5))
    s = InputSet(x, rand(M, N), base.weight, None, lora_A, lora_B)
    config = LoraConfig(r=R, lora_alpha=LORA_ALPHA, lora_dropout=p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_layer = PeftLinear4bit(base, "default", config, r=R, lora_alpha=LORA_ALPHA)
    peft_layer.lora_A["default"].weight = lora_A
    peft_layer.lora_B["default"].weight = lora_B
    peft_layer.train()
    s.fns = {QLORA_FLOOR: base, QLORA_PEFT: peft_layer}
    for backend in backends:
        layer = lora_kernels.LoRALinear(base, R, LORA_ALPHA, p, backend=backend)
        layer.lora_A, layer.lora_B = lora_A, lora_B
        s.fns[f"lk-{backend}"] = layer.train()
    dora_config = LoraConfig(r=R, lora_alpha=LORA_ALPHA, lora_dropout=p, use_dora=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_dora = PeftLinear4bit(
            base, "default", dora_config, r=R, lora_alpha=LORA_ALPHA, use_dora=True
        )
    peft_dora.lora_A["default"].weight = lora_A
    peft_dora.lora_B["default"].weight = lora_B
    dense = lora_kernels.dequantize_4bit(base.weight)
    s.magnitude = random_magnitude(InputSet(x, s.dy, dense, None, lora_A, lora_B), g)
    peft_dora.lora_magnitude_vector["default"].weight = s.magnitude
    s.fns[QDORA_PEFT] = peft_dora.train()
    for backend in backends:
        layer = lora_kernels.LoRALinear(base, R, LORA_ALPHA, p, backend=backend, use_dora=True)
        layer.lora_A, layer.lora_B, layer.lora_magnitude = lora_A, lora_B, s.magnitude
        s.fns[f"lk-dora-{backend}"] = layer.train()
    return s


def qlora_frozen_tensors(s: InputSet) -> list[torch.Tensor]:
    """The packed weight and its quant state: parameters and buffers, not activations."""
    qs = s.weight.quant_state
    state = [qs.absmax, qs.offset, qs.state2.absmax, qs.state2.code, qs.code]
    return [*s.params(), *(t for t in state if isinstance(t, torch.Tensor))]


def qlora_saved_bytes(s: InputSet, provider: str) -> int:
    from lora_kernels import quant4bit

    code = quant4bit.code_table("nf4", s.x.device)  # the cached table the op saves
    _, saved = saved_activations(
        lambda: s.fns[provider](s.x), exclude=[*qlora_frozen_tensors(s), code]
    )
    return saved.bytes
