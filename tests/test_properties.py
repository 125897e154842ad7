"""Property tests: on any valid input, every backend matches the float64 reference.

Hypothesis draws the shapes (M from 0, leading dims, K/N/R with R up to and beyond
min(K, N)), the dtypes (float32/float16/bfloat16/float64, adapters in x's dtype or
float32), dropout p, bias on/off, train/eval, the memory layout of x, of the weight,
of the adapters and of the incoming gradient (transposed, strided, offset, broadcast
with stride 0), the scaling (float, constant tensor, learnable tensor) and which
inputs require a gradient. The output and every gradient must be within the per-dtype
tolerance of `helpers.REL_TOL`, element by element, relative to the magnitude of the
terms each element sums (`assert_matches`).

Budgets per backend and profile are in `hypothesis_profiles.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from helpers import DTYPE_IDS, REL_TOL
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_profiles import backend_device_params, budget, profile_params, profile_settings

import lora_kernels
from lora_kernels.ops import SEED_BOUND
from lora_kernels.reference import lora_linear_reference

# Backends that refuse float64 by contract ("float64 where the backend accepts it"):
# for them a float64 case must raise a TypeError naming float64.
REFUSES_FLOAT64 = {"triton"}

X_LAYOUTS = ("contiguous", "transposed", "strided", "offset", "broadcast", "batch-permuted")
MATRIX_LAYOUTS = ("contiguous", "transposed", "offset")
GRAD_LAYOUTS = ("contiguous", "transposed", "broadcast")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def assert_matches(
    out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor, dtype: torch.dtype, what: str
) -> None:
    """|out - ref| <= tol * magnitude, element by element, with tol = helpers.REL_TOL.

    `magnitude` is the reference run on absolute values (|x|, |W|, |b|, |A|, |B|, |s|,
    |dY|): for every element, the sum of the magnitudes of the terms it is made of,
    the quantity that rounding errors scale with. An error relative to |ref| (or to
    ||ref||) cannot be bounded where terms cancel (a 1-element grad of lora_A summing
    K*N products is one); this bound is as tight where they do not, and it holds each
    element (a wrong tail tile or last row cannot hide in the norm of a large tensor).
    """
    tol = max(REL_TOL[dtype], REL_TOL[out.dtype])
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    if out.numel() == 0:
        return
    out64 = out.detach().double()
    assert torch.isfinite(out64).all(), f"{what}: not finite"
    # Below the normal range a rounding step is absolute: the subnormal spacing.
    finfo = torch.finfo(out.dtype) if out.dtype != torch.float64 else torch.finfo(dtype)
    floor = 4 * finfo.tiny * finfo.eps
    excess = (out64 - ref.detach()).abs() / (tol * magnitude.detach() + floor)
    worst = int(excess.argmax())
    assert excess.max() <= 1, (
        f"{what}: element {worst} (flat) is {out64.flatten()[worst].item():.6g}, reference "
        f"{ref.flatten()[worst].item():.6g}, error {excess.max().item():.3g} x the bound "
        f"{tol:.0e} * {magnitude.flatten()[worst].item():.3g}"
    )


@dataclass(frozen=True)
class Case:
    """One drawn input; its repr is the readable id hypothesis prints on failure."""

    lead: tuple[int, ...]  # x is [*lead, K]; M = prod(lead)
    K: int
    N: int
    R: int
    dtype: torch.dtype
    lora_dtype: torch.dtype
    bias: bool
    p: float
    training: bool
    x_layout: str
    weight_layout: str
    adapter_layout: str
    grad_layout: str
    scaling_kind: str  # "float", "tensor" (constant) or "learnable"
    scaling: float
    grads: frozenset[str]  # inputs that require grad: x, weight, bias, lora_A, lora_B, scaling
    seed: int

    @property
    def M(self) -> int:
        return math.prod(self.lead)

    def __repr__(self) -> str:
        lead = "x".join(map(str, self.lead))
        return (
            f"x[{lead}]-K{self.K}-N{self.N}-R{self.R}-{DTYPE_IDS[self.dtype]}"
            f"-A:{DTYPE_IDS[self.lora_dtype]}-p{self.p:g}-{'train' if self.training else 'eval'}"
            f"-{'bias' if self.bias else 'nobias'}-x:{self.x_layout}-W:{self.weight_layout}"
            f"-AB:{self.adapter_layout}-dY:{self.grad_layout}-s:{self.scaling_kind}"
            f"={self.scaling:g}-grads:{','.join(sorted(self.grads)) or 'none'}-seed{self.seed}"
        )


@st.composite
def cases(draw, max_m: int, max_kn: int, max_r: int) -> Case:
    n_lead = draw(st.integers(0, 2))
    outer = tuple(draw(st.lists(st.integers(1, 4), min_size=n_lead, max_size=n_lead)))
    rows = draw(st.integers(0, max_m // math.prod(outer)))
    lead = (*outer, rows)
    K = draw(st.integers(1, max_kn))
    N = draw(st.integers(1, max_kn))
    # Up to min(K, N) and beyond it (a rank above min(K, N) is valid, if wasteful).
    R = draw(st.integers(1, min(max_r, min(K, N) + 8)))
    dtype = draw(st.sampled_from(DTYPES))
    lora_dtype = draw(st.sampled_from(sorted({dtype, torch.float32}, key=str)))
    p = draw(st.one_of(st.sampled_from([0.0, 0.1, 0.5]), st.floats(0.0, 0.95)))
    x_layouts = X_LAYOUTS if len(lead) >= 2 else X_LAYOUTS[:-1]
    scaling_kind = draw(st.sampled_from(["float", "tensor", "learnable"]))
    grads = {name for name in ("x", "bias", "lora_A", "lora_B") if draw(st.booleans())}
    # A trainable weight is valid too: lora_linear then composes plain ops for dW.
    if draw(st.integers(0, 7)) == 0:
        grads.add("weight")
    if scaling_kind == "learnable":
        grads.add("scaling")
    bias = draw(st.booleans())
    if not bias:
        grads.discard("bias")
    return Case(
        lead=lead,
        K=K,
        N=N,
        R=R,
        dtype=dtype,
        lora_dtype=lora_dtype,
        bias=bias,
        p=p,
        training=draw(st.booleans()),
        x_layout=draw(st.sampled_from(x_layouts)),
        weight_layout=draw(st.sampled_from(MATRIX_LAYOUTS)),
        adapter_layout=draw(st.sampled_from(MATRIX_LAYOUTS)),
        grad_layout=draw(st.sampled_from(GRAD_LAYOUTS)),
        scaling_kind=scaling_kind,
        scaling=draw(st.one_of(st.sampled_from([0.0, 0.5, 2.0, -1.25]), st.floats(0.05, 4.0))),
        grads=frozenset(grads),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _storage_and_view(shape: tuple[int, ...], layout: str):
    """(storage shape, storage -> tensor of `shape` with that layout)."""
    *lead, last = shape
    if layout == "contiguous":
        return shape, lambda t: t
    if layout == "transposed":
        # The last dim becomes the slowest: its stride is the product of the others.
        return (last, *lead), lambda t: t.movedim(0, -1)
    if layout == "strided":
        return (*lead, 2 * last), lambda t: t[..., ::2]
    if layout == "offset":
        # Rows padded and the view starting mid-storage (a slice of a wider tensor).
        return (*lead, last + 5), lambda t: t[..., 2 : last + 2]
    if layout == "broadcast":
        # One row seen by every leading index: strides 0.
        return (last,), lambda t: t.expand(shape)
    if layout == "batch-permuted":
        # The two outer dims swapped in memory: flattening them must copy or stride.
        return (lead[1], lead[0], *lead[2:], last), lambda t: t.transpose(0, 1)
    raise AssertionError(layout)


@dataclass
class Operand:
    """A leaf tensor, the view the op sees, and how to build that view again."""

    leaf: torch.Tensor
    view: torch.Tensor
    make_view: object


def _operand(g, shape, layout, dtype, device, scale, requires_grad) -> Operand:
    storage_shape, make_view = _storage_and_view(tuple(shape), layout)
    values = torch.randn(storage_shape, generator=g, dtype=torch.float64) * scale
    leaf = values.to(dtype).to(device).requires_grad_(requires_grad)
    return Operand(leaf, make_view(leaf), make_view)


def check_case(case: Case, backend: str, device_type: str) -> None:
    """lora_linear on `backend` vs the float64 reference for the output and every grad."""
    g = torch.Generator().manual_seed(case.seed)
    K, N, R = case.K, case.N, case.R
    x = _operand(g, (*case.lead, K), case.x_layout, case.dtype, device_type, 1.0, "x" in case.grads)
    weight = _operand(
        g,
        (N, K),
        case.weight_layout,
        case.dtype,
        device_type,
        max(K, 1) ** -0.5,
        "weight" in case.grads,
    )
    bias = (
        _operand(g, (N,), "contiguous", case.dtype, device_type, 1.0, "bias" in case.grads)
        if case.bias
        else None
    )
    lora_A = _operand(
        g,
        (R, K),
        case.adapter_layout,
        case.lora_dtype,
        device_type,
        max(K, 1) ** -0.5,
        "lora_A" in case.grads,
    )
    # B scaled so that the LoRA term is as large as the base term: a wrong branch shows.
    lora_B = _operand(
        g,
        (N, R),
        case.adapter_layout,
        case.lora_dtype,
        device_type,
        R**-0.5,
        "lora_B" in case.grads,
    )
    if case.scaling_kind == "float":
        scaling = case.scaling
    else:
        scaling = torch.tensor(case.scaling, dtype=case.lora_dtype, device=device_type)
        scaling.requires_grad_(case.scaling_kind == "learnable")
    grad_y = _operand(g, (*case.lead, N), case.grad_layout, case.dtype, device_type, 1.0, False)

    torch.manual_seed(case.seed)
    rng_before = torch.get_rng_state()
    call = lambda: lora_kernels.lora_linear(  # noqa: E731
        x.view,
        weight.view,
        None if bias is None else bias.view,
        lora_A.view,
        lora_B.view,
        scaling,
        case.p,
        training=case.training,
        backend=backend,
    )
    # A trainable weight is served by plain ATen ops, whatever the backend.
    if case.dtype == torch.float64 and backend in REFUSES_FLOAT64 and "weight" not in case.grads:
        with pytest.raises(TypeError, match="float64"):
            call()
        return
    y = call()
    dropout = case.p > 0 and case.training
    if not dropout:
        assert torch.equal(torch.get_rng_state(), rng_before), "drew a seed without dropout"
    # The op drew its seed so; drawing it again hands the same mask to the reference.
    torch.manual_seed(case.seed)
    seed = torch.randint(SEED_BOUND, (), dtype=torch.int64) if dropout else 0

    assert y.shape == (*case.lead, N) and y.dtype == case.dtype and y.device.type == device_type
    named = {"x": x, "weight": weight, "bias": bias, "lora_A": lora_A, "lora_B": lora_B}
    wrt = sorted(case.grads)
    y64, grads64 = reference_run(case, named, scaling, grad_y.view, seed, wrt)
    magnitude, grad_magnitudes = reference_run(
        case, named, scaling, grad_y.view, seed, wrt, magnitudes=True
    )
    assert_matches(y, y64, magnitude, case.dtype, "output")
    if not wrt:
        assert not y.requires_grad
        return
    leaves = {name: op.leaf for name, op in named.items() if op is not None}
    leaves["scaling"] = scaling
    grads = torch.autograd.grad(y, [leaves[n] for n in wrt], grad_y.view)
    for name, grad, grad64, bound in zip(wrt, grads, grads64, grad_magnitudes, strict=True):
        assert grad.dtype == leaves[name].dtype, f"grad of {name}: dtype {grad.dtype}"
        # float32 adapters on a half layer still see half-precision products upstream.
        assert_matches(grad, grad64, bound, case.dtype, f"grad of {name}")


def reference_run(case, named, scaling, grad_y, seed, wrt, magnitudes=False):
    """The float64 reference's output and gradients of `wrt`, for the same operands,
    or with magnitudes=True for their absolute values (the bounds of `assert_matches`).
    """
    f = torch.abs if magnitudes else (lambda t: t)
    leaves64, views64 = {}, {}
    for name, op in named.items():
        if op is None:
            leaves64[name] = views64[name] = None
            continue
        leaf = f(op.leaf.detach().double()).requires_grad_(op.leaf.requires_grad)
        leaves64[name], views64[name] = leaf, op.make_view(leaf)
    if isinstance(scaling, torch.Tensor):
        s64 = f(scaling.detach().double()).requires_grad_(scaling.requires_grad)
    else:
        s64 = abs(scaling) if magnitudes else scaling
    leaves64["scaling"] = s64
    args = [views64[n] for n in ("x", "weight", "bias", "lora_A", "lora_B")]
    y64 = lora_linear_reference(*args, s64, case.p, case.training, seed)
    if not wrt:
        return y64, []
    grads = torch.autograd.grad(y64, [leaves64[n] for n in wrt], f(grad_y.double()))
    return y64.detach(), grads


@pytest.mark.parametrize("profile", profile_params())
@pytest.mark.parametrize("device_type, backend", backend_device_params())
def test_output_and_gradients_match_reference_on_any_valid_input(device_type, backend, profile):
    b = budget(profile, backend, device_type)

    @profile_settings(profile, b.examples)
    @given(case=cases(b.max_m, b.max_kn, b.max_r))
    def run(case):
        check_case(case, backend, device_type)

    run()


# Shapes at the edges that the strategy reaches rarely or not at all.
EDGE_CASES = [
    # lead, K, N, R
    pytest.param((0,), 7, 5, 3, id="M0"),
    pytest.param((2, 0, 3), 7, 5, 3, id="M0-in-lead-dims"),
    pytest.param((1,), 1, 1, 1, id="M1-K1-N1-R1"),
    pytest.param((5,), 0, 4, 2, id="K0"),
    pytest.param((5,), 6, 0, 2, id="N0"),
    pytest.param((6,), 3, 4, 9, id="R-above-K-and-N"),
    pytest.param((7,), 1, 33, 1, id="K1"),
    pytest.param((3,), 64, 64, 64, id="R-equals-K-and-N"),
]


@pytest.mark.parametrize("device_type, backend", backend_device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p", [0.0, 0.3], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("lead, K, N, R", EDGE_CASES)
def test_edge_shapes_match_reference(device_type, backend, dtype, p, lead, K, N, R):
    case = Case(
        lead=lead,
        K=K,
        N=N,
        R=R,
        dtype=dtype,
        lora_dtype=torch.float32,
        bias=True,
        p=p,
        training=True,
        x_layout="contiguous",
        weight_layout="contiguous",
        adapter_layout="contiguous",
        grad_layout="contiguous",
        scaling_kind="learnable",
        scaling=1.5,
        grads=frozenset({"x", "bias", "lora_A", "lora_B", "scaling"}),
        seed=17,
    )
    check_case(case, backend, device_type)
