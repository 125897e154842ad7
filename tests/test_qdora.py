"""DoRA over 4-bit bitsandbytes base weights (QDoRA): `dora_linear` on a `Params4bit`,
`LoRALinear(Linear4bit, use_dora=True)`, its merge, the norm cache, `patch_peft` and
the adapter format on a 4-bit model.

The float64 reference is peft's DoRA formula over bitsandbytes' own dequantized
weights, as its 4-bit DoRA layer takes them: the base products from W dequantized to
the compute dtype (dX's through `quant_state.dtype`, `MatMul4Bit.backward`), the
norm n from W in `quant_state.dtype` (`dequantize_module_weight`). One rounding is
ours: with dropout, peft forms the dropped base product from W in `quant_state.dtype`,
we from the forward's W (the same W where the compute dtype is `quant_state.dtype`). Buffers
lora_kernels allocates, the workspace included, are poisoned with NaN. Without CUDA
the Triton kernels run under TRITON_INTERPRET=1 on tiny shapes.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import DTYPE_IDS, assert_close, rel_error  # noqa: E402
from test_dora import FixedMaskDropout, check_grads_against_peft, plain_op_mask  # noqa: E402
from test_qlora import (  # noqa: E402
    _CPU_BACKENDS,
    _TRITON_MARKS,
    bnb_weights,
    linear4bit,
    load_llama_4bit,
    params4bit,
    saved_tensors,
    train_then_check_adapter_round_trip,
)

import lora_kernels  # noqa: E402
from lora_kernels import dora, quant4bit, reference  # noqa: E402

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
import bitsandbytes.functional as bnbF  # noqa: E402

F32, F64 = torch.float32, torch.float64
pytestmark = pytest.mark.usefixtures("poisoned_empty")


def qdora_float64(x, w_forward, w_norm, bias, A, B, m, s, keep, p):
    """peft's DoRA formula in float64 for x [M, K]: the products over `w_forward`, n
    over `w_norm` (detached); `keep` None without dropout."""
    n = torch.linalg.norm(w_norm + s.detach() * (B @ A).detach(), dim=1).detach()
    g = m / n
    if keep is None:
        lora_x = x
        base = x @ w_forward.T
        y = base + (g - 1) * base + g * s * ((lora_x @ A.T) @ B.T)
    else:
        lora_x = x * keep * reference.dropout_scale(p)
        y = x @ w_forward.T + (g - 1) * (lora_x @ w_forward.T) + g * s * ((lora_x @ A.T) @ B.T)
    return y + bias if bias is not None else y


def qdora_inputs(M, K, N, R, dtype, bias, weight, seed=0):
    """x [M, K] in `dtype`, float32 A, B, s and m = the row norms times [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed + 7 * M + K)

    def rand(*shape, dt=F32, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dt).requires_grad_()

    x = rand(M, K, dt=dtype)
    b = rand(N, dt=dtype) if bias else None
    A = rand(R, K, scale=K**-0.5)
    B = rand(N, R, scale=R**-0.5)
    s = torch.tensor(0.75, requires_grad=True)
    n = reference.dora_weight_norm_reference(
        lora_kernels.dequantize_4bit(weight).to(F64), A.double(), B.double(), 0.75
    )
    m = (n * (0.5 + torch.rand(N, generator=g, dtype=F64))).to(F32).requires_grad_()
    return x, b, A, B, m, s


def check_against_peft_formula(backend, weight, M, R, dtype, bias, p, zero_rows=None):
    N, K = weight.quant_state.shape
    x, b, A, B, m, s = qdora_inputs(M, K, N, R, dtype, bias, weight)
    if zero_rows is not None:
        with torch.no_grad():
            m[zero_rows] = 0
    torch.manual_seed(11)
    y = lora_kernels.dora_linear(x, weight, b, A, B, m, s, p, backend=backend)
    assert y.dtype == dtype and y.shape == (M, N)
    keep = plain_op_mask(M, K, p, 11) if p > 0 else None
    if p > 0:
        assert not keep.all() and keep.any()
    w_forward, w_backward = bnb_weights(weight, dtype)
    w_norm = bnbF.dequantize_4bit(weight.data, weight.quant_state).double()
    named = {"x": x, "bias": b, "lora_A": A, "lora_B": B, "magnitude": m, "scaling": s}
    named = {k: t for k, t in named.items() if t is not None}
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    grad_y = grad_y.to(dtype)
    grads = dict(zip(named, torch.autograd.grad(y, list(named.values()), grad_y), strict=True))

    def reference_grads(w):
        up = {k: t.detach().double().requires_grad_() for k, t in named.items()}
        y64 = qdora_float64(
            up["x"], w.double(), w_norm, up.get("bias"), up["lora_A"], up["lora_B"],
            up["magnitude"], up["scaling"], keep, p,
        )  # fmt: skip
        grads64 = torch.autograd.grad(y64, list(up.values()), grad_y.double())
        return y64, dict(zip(up, grads64, strict=True))

    y64, grads64 = reference_grads(w_forward)
    grads64["x"] = reference_grads(w_backward)[1]["x"]
    assert_close(y, y64, dtype, "output")
    for name, grad in grads.items():
        assert grad.dtype == named[name].dtype, f"grad of {name}: dtype {grad.dtype}"
        assert grads64[name].abs().max() > 0, f"grad of {name} is zero: the check could not fail"
        assert_close(grad, grads64[name], dtype, f"grad of {name}")
    if zero_rows is not None:
        # g = 0 there: Y holds nothing of Z, whose columns backward recomputes from W.
        want = grads64["magnitude"][zero_rows]
        assert want.abs().min() > 0
        assert_close(grads["magnitude"][zero_rows], want, dtype, "grad of m where m = 0")


# (quant type, double quant, storage, quant_state.dtype, compute dtype): both compute
# dtypes meet a weight dtype of their own and one of the other.
QUANT_CASES = [
    pytest.param("nf4", True, torch.uint8, F32, F32, id="nf4-dq-u8-wfp32-fp32"),
    pytest.param(
        "fp4", False, torch.bfloat16, torch.bfloat16, F32, id="fp4-bf16storage-wbf16-fp32"
    ),
    pytest.param("nf4", True, torch.uint8, torch.bfloat16, torch.bfloat16, id="nf4-dq-wbf16-bf16"),
    pytest.param("nf4", False, torch.uint8, torch.float16, torch.float16, id="nf4-wfp16-fp16"),
]


@pytest.mark.parametrize("backend", _CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("qt, nested, storage, wdtype, dtype", QUANT_CASES)
def test_dora_linear_over_4bit_matches_peft_formula_float64(
    qt, nested, storage, wdtype, dtype, bias, p, backend
):
    weight = params4bit(33, 71, quant_type=qt, nested=nested, storage=storage, dtype=wdtype)
    check_against_peft_formula(backend, weight, 13, 5, dtype, bias, p)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize(
    "wdtype, dtype",
    [
        pytest.param(F32, F32, id="wfp32-fp32", marks=_TRITON_MARKS),
        pytest.param(torch.bfloat16, torch.float16, id="wbf16-fp16", marks=_TRITON_MARKS),
    ],
)
def test_dora_linear_over_4bit_on_triton_matches_peft_formula_float64(wdtype, dtype, p):
    weight = params4bit(17, 45, dtype=wdtype, blocksize=32)
    check_against_peft_formula("triton", weight, 21, 3, dtype, True, p)


@pytest.mark.parametrize("backend", _CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_zero_magnitude_rows_get_their_gradient_over_4bit(backend, p):
    weight = params4bit(17, 45, dtype=torch.bfloat16)
    check_against_peft_formula(backend, weight, 9, 3, F32, True, p, zero_rows=[0, 5, 16])


@pytest.mark.parametrize("backend", _CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_backward_keeps_no_dequantized_weight(backend, p):
    """What DoRA keeps on a dense weight, less that weight, plus the packed weight and
    its quant state (parameters and buffers, not activations)."""
    M, K, N, R = 16, 96, 80, 4
    weight = params4bit(N, K)
    x, b, A, B, m, s = qdora_inputs(M, K, N, R, F32, True, weight)
    saved, y = saved_tensors(
        lambda: lora_kernels.dora_linear(x, weight, b, A, B, m, s, p, backend=backend)
    )
    dense = lora_kernels.dequantize_4bit(weight)
    saved_dense, _ = saved_tensors(
        lambda: lora_kernels.dora_linear(x, dense, b, A, B, m, s, p, backend=backend)
    )

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    assert not any(t.is_floating_point() and t.numel() >= N * K for t in saved)
    qs = weight.quant_state
    state = [qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset]
    packed_and_code = (N * K + 1) // 2 + 16 * 4
    assert nbytes(saved) == nbytes(saved_dense) - N * K * 4 + nbytes(state) + packed_and_code
    y.sum().backward()
    assert all(t.grad is not None for t in (x, b, A, B, m, s))


def test_workspace_reuse_across_layers_gives_both_layers_gradients():
    """Layer 2 overwrites the workspace between layer 1's forward and backward."""
    K = N = 48
    layers = [
        lora_kernels.LoRALinear(linear4bit(K, N, seed=i), rank=3, use_dora=True) for i in (0, 1)
    ]
    for layer in layers:
        with torch.no_grad():
            layer.lora_B.normal_(std=0.3)
            layer.lora_magnitude.mul_(1.3)
    x = torch.randn(7, K, requires_grad=True)
    y = layers[1](layers[0](x))
    y.sum().backward()
    dense = [
        nn.Linear(K, N).requires_grad_(False) for _ in layers
    ]  # the same layers over dense copies of their weights
    for lin, layer in zip(dense, layers, strict=True):
        with torch.no_grad():
            lin.weight.copy_(lora_kernels.dequantize_4bit(layer.original_linear.weight))
            lin.bias.copy_(layer.original_linear.bias)
    x2 = x.detach().clone().requires_grad_()
    params = [(layer.lora_A, layer.lora_B, layer.lora_magnitude) for layer in layers]
    h = x2
    for lin, (A, B, m) in zip(dense, params, strict=True):
        h = lora_kernels.dora_linear(h, lin.weight, lin.bias, A, B, m, layers[0].scaling)
    grads = torch.autograd.grad(h.sum(), [x2, *[t for trio in params for t in trio]])
    assert_close(y, h, F32, "output")
    assert_close(x.grad, grads[0], F32, "grad of x")
    for got, want in zip([t.grad for trio in params for t in trio], grads[1:], strict=True):
        assert_close(got, want, F32, "adapter grad")


# ---------------------------------------------------------------------------------------
# LoRALinear over a Linear4bit against peft's 4-bit DoRA layer; merge; the norm cache
# ---------------------------------------------------------------------------------------


def ours_and_peft_4bit(compute_dtype, quant, dropout=0.0, K=40, N=24, R=4):
    """LoRALinear(use_dora=True) and peft's lora.bnb.Linear4bit over two equal 4-bit
    bases, with equal random A, B and m (B random, m off the norms)."""
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    config = LoraConfig(r=R, lora_alpha=8, lora_dropout=dropout, use_dora=True)
    theirs = PeftLinear4bit(
        linear4bit(K, N, compute_dtype=compute_dtype, **quant), "default", config, r=R,
        lora_alpha=8, lora_dropout=dropout, use_dora=True,
    )  # fmt: skip
    ours = lora_kernels.LoRALinear(
        linear4bit(K, N, compute_dtype=compute_dtype, **quant), rank=R, alpha=8,
        dropout=dropout, use_dora=True,
    )  # fmt: skip
    # Both start at the norms of the dequantized W (B = 0); built directly, peft's layer
    # gives its adapter the weight's dtype (and takes the norm in it), get_peft_model
    # then casts the adapter to float32 (autocast_adapter_dtype), as done here.
    peft_m = theirs.lora_magnitude_vector["default"].weight
    assert_close(ours.lora_magnitude, peft_m, peft_m.dtype, "m init")
    for adapter_part in (theirs.lora_A, theirs.lora_B, theirs.lora_magnitude_vector):
        adapter_part.float()
    peft_m = theirs.lora_magnitude_vector["default"].weight
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        ours.lora_A.copy_(torch.randn(R, K, generator=g) * 0.3)
        ours.lora_B.copy_(torch.randn(N, R, generator=g) * 0.3)
        ours.lora_magnitude.mul_(0.5 + torch.rand(N, generator=g))
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
        peft_m.copy_(ours.lora_magnitude)
    return ours, theirs


PEFT_CASES = [
    pytest.param(F32, {"quant_type": "nf4", "nested": True}, id="nf4-dq-fp32"),
    pytest.param(
        F32, {"quant_type": "fp4", "nested": False, "dtype": torch.bfloat16}, id="fp4-wbf16-fp32"
    ),
    pytest.param(
        torch.bfloat16, {"quant_type": "nf4", "dtype": torch.bfloat16}, id="nf4-wbf16-bf16"
    ),
]


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["p0", "p0.1-peft_given_our_mask"])
@pytest.mark.parametrize("compute_dtype, quant", PEFT_CASES)
def test_layer_matches_peft_4bit_dora(compute_dtype, quant, dropout):
    ours, theirs = ours_and_peft_4bit(compute_dtype, quant, dropout)
    M, K = 11, 40
    if dropout > 0:
        # peft's dropout replaced by one with the mask our op draws after seed 4.
        theirs.lora_dropout["default"] = FixedMaskDropout(
            plain_op_mask(2 * M, K, dropout, 4), dropout
        )
    x_dtype = quant.get("dtype", F32)
    x = torch.randn(2, M, K, generator=torch.Generator().manual_seed(1)).to(x_dtype)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(4)
    y = ours(x_ours)
    y_peft = theirs(x_theirs)
    assert y.dtype == y_peft.dtype == x_dtype
    # peft's 4-bit layer rounds its base result to x's dtype before DoRA reads it (dm
    # too): the coarser of x's and the compute dtype's tolerance.
    tol_dtype = x_dtype if x_dtype != F32 else compute_dtype
    assert_close(y, y_peft, tol_dtype, "output")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype)
    y.backward(grad_y)
    y_peft.backward(grad_y)
    check_grads_against_peft(ours, theirs, x_ours, x_theirs, tol_dtype)


@pytest.mark.parametrize("compute_dtype, quant", PEFT_CASES[:2])
def test_merge_and_unmerge_requantize_exactly_as_peft(compute_dtype, quant):
    ours, theirs = ours_and_peft_4bit(compute_dtype, quant)
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in ("merge", "unmerge"):
            getattr(ours, step)()
            getattr(theirs, step)()
            ours_w = ours.original_linear.weight
            theirs_w = theirs.base_layer.weight
            assert torch.equal(ours_w.data, theirs_w.data), f"{step}: packed codes differ"
            assert ours_w.quant_state.dtype == theirs_w.quant_state.dtype
            assert torch.equal(
                quant4bit.dequantize_4bit(ours_w), quant4bit.dequantize_4bit(theirs_w)
            ), f"{step}: dequantized weights differ"
            # Train mode: bitsandbytes' eval-mode CPU kernel refuses these small layers.
            with torch.no_grad():
                assert_close(ours(x), theirs(x), compute_dtype, f"output after {step}")
    assert not ours.merged and ours._dora_merge_scale is None


def test_merge_weights_and_merged_forward_agree():
    ours, _ = ours_and_peft_4bit(F32, {"quant_type": "nf4"})
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = ours.merge_weights()
        w = lora_kernels.dequantize_4bit(ours.original_linear.weight).double()
        n = reference.dora_weight_norm_reference(
            w, ours.lora_A.double(), ours.lora_B.double(), ours.scaling
        )
        g = ours.lora_magnitude.double() / n
        want = g[:, None] * (w + ours.scaling * ours.lora_B.double() @ ours.lora_A.double())
        assert_close(dense.weight, want, F32, "merge_weights")
        assert_close(dense(x), ours(x), F32, "dense merged layer against the unmerged layer")


def test_merge_refuses_a_zero_magnitude():
    ours, _ = ours_and_peft_4bit(F32, {"quant_type": "nf4"})
    packed = ours.original_linear.weight.data.clone()
    with torch.no_grad():
        ours.lora_magnitude[3] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"m/n is 0 on row\(s\) \[3\]"):
            ours.merge()
    assert not ours.merged and torch.equal(ours.original_linear.weight.data, packed)


def expected_output(layer, x):
    """The layer's output from its current values, through the direct norm of the
    dequantized W."""
    lin = layer.original_linear
    w = lora_kernels.dequantize_4bit(lin.weight)
    n = reference.dora_weight_norm_reference(w, layer.lora_A, layer.lora_B, layer.scaling)
    return reference.dora_linear_reference(
        x, w, lin.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude, layer.scaling,
        weight_norm=n,
    )  # fmt: skip


def _merge_then_unmerge(layer, other):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer.merge()
        layer.unmerge()


def _new_params4bit(layer, other):
    layer.original_linear.weight = other.weight


def _packed_codes_copied_in(layer, other):
    # The same quant state, other codes written in place: the version counter moves.
    layer.original_linear.weight.copy_(other.weight.data)


@pytest.mark.parametrize(
    "change",
    [_merge_then_unmerge, _new_params4bit, _packed_codes_copied_in],
    ids=["merge+unmerge", "new_params4bit", "codes_copy_"],
)
def test_norm_cache_is_keyed_on_the_4bit_weight(change, monkeypatch):
    ours, _ = ours_and_peft_4bit(F32, {"quant_type": "nf4", "nested": False})
    x = torch.randn(5, 40)
    calls = []
    real = dora.squared_row_norms
    monkeypatch.setattr(dora, "squared_row_norms", lambda w: calls.append(1) or real(w))
    ours(x)
    ours(x)
    assert calls == []  # filled when the magnitude was initialised
    stale = ours._weight_norm_cache._value.clone()
    other = linear4bit(40, 24, seed=9, quant_type="nf4", nested=False)
    with torch.no_grad():
        change(ours, other)
    new = dora.squared_row_norms(lora_kernels.dequantize_4bit(ours.original_linear.weight))
    if change is not _merge_then_unmerge:
        # A stale ||W_n||^2 would be far off: the test would catch its use.
        assert (new - stale).abs().max() > 0.1 * stale.abs().max()
    assert_close(ours(x), expected_output(ours, x), F32, "output after the weight changed")
    assert calls


# ---------------------------------------------------------------------------------------
# A 4-bit transformers model: patch_peft, apply_lora, the adapter format
# ---------------------------------------------------------------------------------------


class OpNamespaces(TorchDispatchMode):
    """The namespaces of the ops dispatched while active (custom ops included)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def _dora_peft_model(path, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from tiny_models import LLAMA_TARGETS, randomize_peft_lora

    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=LLAMA_TARGETS, use_dora=True
    )
    peft_model = get_peft_model(load_llama_4bit(path), config)
    randomize_peft_lora(peft_model)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand(param.shape, generator=g))
    return peft_model


def test_patch_peft_serves_peft_4bit_dora_layers(llama_4bit_dir):
    from tiny_models import llama_batch

    from lora_kernels import peft_patch

    peft_model = _dora_peft_model(llama_4bit_dir)
    batch = llama_batch()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    assert sum("lora_magnitude_vector" in n for n, p in peft_model.named_parameters()) == 8

    def loss_and_grads():
        loss = peft_model(**batch).loss
        return loss.detach(), torch.autograd.grad(loss, params)

    expected, expected_grads = loss_and_grads()
    report = lora_kernels.patch_peft(peft_model)
    assert len(report.patched) == 8 and len(report.dora_served) == 8, str(report)
    assert all(
        type(m).__name__ == peft_patch.PATCHED_4BIT_CLASS_NAME
        for name, m in peft_model.named_modules()
        if name in report.patched
    )
    with OpNamespaces() as seen:
        loss, grads = loss_and_grads()
    assert {"lora_kernels::qdora_forward", "lora_kernels::qdora_backward"} <= seen.names
    assert report.calls.fused == 8 and report.calls.dora == 8 and not report.calls.by_peft
    assert rel_error(loss, expected) <= 1e-6
    for got, want in zip(grads, expected_grads, strict=True):
        assert rel_error(got, want) <= 1e-5
    with peft_model.disable_adapter():
        peft_model(**batch)
    assert report.calls.by_peft["adapters disabled"] == 8
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_model(**batch)
    assert sum("autocast" in why for why in report.calls.by_peft) == 1
    assert len(lora_kernels.unpatch_peft(peft_model)) == 8
    assert torch.equal(peft_model(**batch).loss.detach(), expected)


def test_patched_4bit_dora_merge_drops_the_norm_cache(llama_4bit_dir):
    from tiny_models import llama_batch

    peft_model = _dora_peft_model(llama_4bit_dir)
    lora_kernels.patch_peft(peft_model)
    ids = llama_batch()["input_ids"]
    with torch.no_grad():
        peft_model(input_ids=ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model.merge_adapter()
            peft_model.unmerge_adapter()
        got = peft_model(input_ids=ids).logits
        lora_kernels.unpatch_peft(peft_model)
        want = peft_model(input_ids=ids).logits
    assert rel_error(got, want) <= 1e-5


def test_apply_lora_dora_on_4bit_trains_and_round_trips_with_peft(llama_4bit_dir, tmp_path):
    from tiny_models import LLAMA_TARGETS, llama_batch

    model = load_llama_4bit(llama_4bit_dir)
    lora_kernels.apply_lora(
        model, rank=4, alpha=8, dropout=0.1, target_modules=LLAMA_TARGETS, use_dora=True
    )
    layers = [layer for _, layer in lora_kernels.lora_layers(model)]
    assert len(layers) == 8 and all(layer.quantized and layer.use_dora for layer in layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.dim() == 1 for p in trainable) == 8  # the magnitudes
    # Ours -> peft's format -> peft and -> ours, on fresh 4-bit bases.
    train_then_check_adapter_round_trip(model, llama_4bit_dir, tmp_path)

    # peft's own 4-bit DoRA adapter -> load_adapter.
    peft_model = _dora_peft_model(llama_4bit_dir)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = lora_kernels.load_adapter(load_llama_4bit(llama_4bit_dir), tmp_path / "peft")
    ids = llama_batch()["input_ids"]
    with torch.no_grad():
        want = peft_model.train()(input_ids=ids).logits
        assert rel_error(ours.train()(input_ids=ids).logits, want) <= 1e-5


# ---------------------------------------------------------------------------------------
# torch.compile, checkpointing, torch.func, opcheck, errors
# ---------------------------------------------------------------------------------------


def _dora_4bit_layer(dropout=0.1):
    layer, _ = ours_and_peft_4bit(F32, {"quant_type": "nf4"}, dropout=dropout)
    return layer


def test_compile_fullgraph_inductor_matches_eager_with_dropout():
    from torch._inductor import config as inductor_config

    layer = _dora_4bit_layer()
    params = (layer.lora_A, layer.lora_B, layer.lora_magnitude)
    x = torch.randn(2, 5, 40, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    with inductor_config.patch(fallback_random=True, compile_threads=1):
        torch.manual_seed(0)
        y = compiled(x)
        y.sum().backward()
    grads = [t.grad.clone() for t in (x, *params)]
    for t in (x, *params):
        t.grad = None
    torch.manual_seed(0)
    y_eager = layer(x)
    y_eager.sum().backward()
    assert_close(y, y_eager, F32, "compiled output")
    for got, t in zip(grads, (x, *params), strict=True):
        assert_close(got, t.grad, F32, "compiled gradient")


def test_activation_checkpointing_recomputes_the_same_masks():
    from torch.utils.checkpoint import checkpoint

    layer = _dora_4bit_layer()
    params = (layer.lora_A, layer.lora_B, layer.lora_magnitude)
    x = torch.randn(9, 40, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), [x, *params])
    torch.manual_seed(3)
    y_ckpt = checkpoint(layer, x, use_reentrant=False)
    grads_ckpt = torch.autograd.grad(y_ckpt.square().sum(), [x, *params])
    assert torch.equal(y, y_ckpt)
    for got, want in zip(grads_ckpt, grads, strict=True):
        assert torch.equal(got, want)


def test_torch_func_grad_matches_autograd():
    weight = params4bit(24, 40)
    x, b, A, B, m, s = qdora_inputs(6, 40, 24, 3, F32, True, weight)

    def loss(magnitude, lora_B):
        return (
            lora_kernels.dora_linear(
                x.detach(), weight, b.detach(), A.detach(), lora_B, magnitude, 0.5
            )
            .square()
            .sum()
        )

    grad_func = torch.func.grad(loss, argnums=(0, 1))(m.detach(), B.detach())
    grad_autograd = torch.autograd.grad(loss(m, B), [m, B])
    for got, want in zip(grad_func, grad_autograd, strict=True):
        assert_close(got, want, F32, "torch.func gradient")


@pytest.mark.parametrize("backend", _CPU_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_opcheck_qdora_forward(backend, p):
    weight = params4bit(24, 40)
    w = quant4bit.read_4bit_weight(weight)
    x, b, A, B, m, s = qdora_inputs(6, 40, 24, 3, F32, True, weight)
    n = dora.weight_row_norm(lora_kernels.dequantize_4bit(weight), A, B, s)
    args = (
        x, w.packed, w.absmax, w.code, w.absmax_code, w.absmax2, w.offset, b, A, B, m, n,
        s.detach(), torch.tensor(5), w.blocksize, w.blocksize2, 24, w.dtype, w.quant_type, p,
        backend, backend,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.lora_kernels.qdora_forward.default, args)


def test_errors_name_the_argument():
    weight = params4bit(24, 40)
    x, b, A, B, m, s = qdora_inputs(4, 40, 24, 3, F32, True, weight)
    with pytest.raises(ValueError, match=r"magnitude must have shape \[24\]"):
        lora_kernels.dora_linear(x, weight, b, A, B, m[:23], s)
    with pytest.raises(TypeError, match="magnitude must have lora_A's dtype"):
        lora_kernels.dora_linear(x, weight, b, A, B, m.double(), s)
    with pytest.raises(TypeError, match="norm_cache must be"):
        lora_kernels.dora_linear(x, weight, b, A, B, m, s, norm_cache={})
    with pytest.raises(ValueError, match="x's last dimension must equal in_features = 40"):
        lora_kernels.dora_linear(x[:, :39], weight, b, A, B, m, s)
    with pytest.raises(NotImplementedError, match="init='svd' on a 4-bit"):
        lora_kernels.LoRALinear(linear4bit(40, 24), rank=3, init="svd", use_dora=True)


def test_magnitude_starts_at_the_norms_and_the_output_at_the_base():
    base = linear4bit(40, 24, quant_type="fp4", dtype=torch.bfloat16)
    layer = lora_kernels.LoRALinear(copy.deepcopy(base), rank=3, use_dora=True)
    w = bnbF.dequantize_4bit(base.weight.data, base.weight.quant_state).double()
    assert_close(layer.lora_magnitude, w.norm(dim=1), F32, "m init")
    x = torch.randn(5, 40)
    with torch.no_grad():
        assert_close(layer(x), base(x), F32, "output at init")


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id=DTYPE_IDS[torch.bfloat16])])
def test_compute_dtype_is_the_base_layers(dtype):
    """As Linear4bit: x cast to compute_dtype, the output back to x's dtype."""
    layer = lora_kernels.LoRALinear(linear4bit(40, 24, compute_dtype=dtype), rank=3, use_dora=True)
    x = torch.randn(5, 40)
    y = layer(x)
    assert y.dtype == F32
    want = layer(x.to(dtype)).float()
    assert torch.equal(y, want)
