"""State: save/load, deepcopy and pickle of models with adapters, merge/unmerge.

Beyond test_layer.py (one layer's state_dict, deepcopy and pickle; merge/unmerge round
trip for fp32/bf16/fp16 on one shape; NaN B, fp16 overflow) and test_model.py (a model's
deepcopy and pickle in eval mode, merge_lora refusing an inf B): every backend, a model
mid-training, torch.save/torch.load, merged clones, the round trip drawn by hypothesis
over dtypes, shapes and delta sizes, and the other ways a merge goes non-finite.
"""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from helpers import DTYPE_IDS
from hypothesis import given
from hypothesis import strategies as st
from hypothesis_profiles import backend_device_params, profile_params, profile_settings
from torch import nn

from lora_kernels import LoRALinear, apply_lora, lora_layers, merge_lora

BACKENDS = backend_device_params()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 6)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def adapted_model(backend, device_type, seed=0):
    """Tiny with adapters (dropout, learnable scaling) whose B is not zero."""
    torch.manual_seed(seed)
    model = apply_lora(
        Tiny().to(device_type), 3, 6, dropout=0.1, learnable_scaling=True, backend=backend
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return model


def data(device_type):
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 7, 12, generator=g).to(device_type)


def step(model, x, seed=11):
    """One seeded training forward+backward: (output, {param name: grad})."""
    model.train()
    model.zero_grad()
    torch.manual_seed(seed)
    y = model(x)
    y.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), grads


def sgd(model, lr=0.1):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.sub_(lr * p.grad)


def assert_same_step(a, b):
    (y_a, grads_a), (y_b, grads_b) = a, b
    assert torch.equal(y_a, y_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("device_type, backend", BACKENDS)
def test_state_dict_round_trip_through_torch_save_gives_the_same_training_step(
    device_type, backend
):
    model = adapted_model(backend, device_type)
    x = data(device_type)
    step(model, x)
    sgd(model)  # the adapter and the scaling moved away from their initial values
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert {k for k in state if "lora" in k or "scaling" in k} == {
        f"{m}.{k}" for m in ("up", "down") for k in ("lora_A", "lora_B", "scaling")
    }

    fresh = adapted_model(backend, device_type, seed=3)
    assert not torch.equal(fresh.up.lora_A, model.up.lora_A)
    fresh.load_state_dict(state)
    assert_same_step(step(fresh, x), step(model, x))
    fresh.eval(), model.eval()
    assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("device_type, backend", BACKENDS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_model_mid_training_copies_into_an_equal_independent_model(device_type, backend, how):
    model = adapted_model(backend, device_type)
    x = data(device_type)
    step(model, x)
    sgd(model)
    step(model, x, seed=12)  # gradients are present when the copy is made (not copied)
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))

    for (_, layer), (_, cloned) in zip(lora_layers(model), lora_layers(clone), strict=True):
        assert (cloned.backend, cloned.dropout, cloned.rank) == (backend, 0.1, 3)
        assert cloned.lora_A.data_ptr() != layer.lora_A.data_ptr()
        # The learnable scaling stays a parameter that trains, not a copy beside it.
        assert any(p is cloned.scaling for p in clone.parameters())
    assert_same_step(step(clone, x), step(model, x))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(clone, x)
    sgd(clone)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"training the copy changed the original's {name}"
    assert not torch.equal(clone.up.lora_B, model.up.lora_B)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_merged_layer_copies_as_merged_and_its_unmerge_leaves_the_original(how):
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    W = base.weight.detach().clone()
    layer = LoRALinear(base, rank=4, alpha=8)
    nn.init.normal_(layer.lora_B)
    layer.merge()
    merged_W = layer.original_linear.weight.detach().clone()
    clone = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    assert clone.merged
    x = torch.randn(5, 20)
    assert torch.equal(clone(x), layer(x))
    clone.unmerge()
    torch.testing.assert_close(clone.original_linear.weight, W, rtol=0, atol=1e-6)
    assert torch.equal(layer.original_linear.weight, merged_W) and layer.merged


@st.composite
def merge_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    return dict(
        dtype=dtype,
        K=draw(st.integers(1, 64)),
        N=draw(st.integers(1, 64)),
        R=draw(st.integers(1, 16)),
        # The size of s B A relative to W, over six orders of magnitude.
        delta_scale=10 ** draw(st.floats(-3, 3)),
        use_rslora=draw(st.booleans()),
        learnable_scaling=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("profile", profile_params())
def test_merge_then_unmerge_restores_the_weight_within_one_rounding_step(profile):
    @profile_settings(profile, 40 if profile == "ci" else 400)
    @given(case=merge_cases())
    def run(case):
        dtype, K, N, R = case["dtype"], case["K"], case["N"], case["R"]
        torch.manual_seed(case["seed"])
        layer = LoRALinear(
            nn.Linear(K, N, dtype=dtype),
            rank=R,
            alpha=2.0,
            use_rslora=case["use_rslora"],
            learnable_scaling=case["learnable_scaling"],
        )
        weight = layer.original_linear.weight
        s = layer._scaling_value()
        with torch.no_grad():
            # B such that |s B A| is delta_scale times |W|'s typical size (K^-0.5).
            b = torch.randn(N, R, dtype=torch.float64) * case["delta_scale"] / (s * math.sqrt(R))
            layer.lora_B.copy_(b)
        W = weight.detach().double().clone()
        A, B = layer.lora_A.double(), layer.lora_B.double()
        delta = s * B @ A
        eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
        compute_eps = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
        # The merge rounds W + d to W's dtype once (half an ulp of |W| + |d|); d itself
        # is a sum of R products formed in float32 (float64 for float64).
        half_ulp = 0.5 * eps * (W.abs() + delta.abs()) * 1.001 + tiny
        merge_bound = half_ulp + R * compute_eps * (abs(s) * B.abs() @ A.abs())
        if dtype == torch.float64:
            merge_bound *= 2  # the expected W + d is then no more exact than the merge
        layer.merge()
        error = (weight.double() - (W + delta)).abs()
        assert (error <= merge_bound).all(), f"merge: {float((error / merge_bound).max()):.3g}"
        layer.unmerge()
        # The unmerge subtracts the same computed d and rounds once more (half an ulp
        # of |W|): d's own error cancels.
        bound = half_ulp + 0.5 * eps * W.abs() * 1.001
        error = (weight.double() - W).abs()
        assert (error <= bound).all(), f"round trip: {float((error / bound).max()):.3g} x bound"

    run()


def _inf_in_A(layer):
    layer.lora_A[0, 1] = float("inf")


def _non_finite_scaling(value):
    def poison(layer):
        layer.scaling.fill_(value)

    return poison


def _overflow(layer):
    # W near the dtype's largest value, and a delta that pushes past it.
    top = torch.finfo(layer.original_linear.weight.dtype).max
    layer.original_linear.weight.fill_(top * 0.75)
    layer.lora_A.fill_(1.0)
    layer.lora_B.fill_(top / layer.scaling.item() / layer.rank)


NON_FINITE_MERGES = [
    pytest.param(torch.float32, _inf_in_A, id="inf-in-A"),
    pytest.param(torch.float32, _non_finite_scaling(float("nan")), id="nan-scaling"),
    pytest.param(torch.float32, _non_finite_scaling(float("inf")), id="inf-scaling"),
    pytest.param(torch.bfloat16, _overflow, id="bf16-overflow"),
    pytest.param(torch.float32, _overflow, id="fp32-overflow"),
]


@pytest.mark.parametrize("dtype, poison", NON_FINITE_MERGES)
@pytest.mark.parametrize("method", ["merge", "merge_weights", "merge_lora"])
def test_a_non_finite_merge_refuses_and_leaves_weight_and_output_untouched(dtype, poison, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8, dtype=dtype))
    apply_lora(model, 2, 4, learnable_scaling=True)
    layer = model[0]
    with torch.no_grad():
        poison(layer)
    W = layer.original_linear.weight.detach().clone()
    x = torch.randn(3, 16).to(dtype)
    with torch.no_grad():
        y = layer(x)
    with pytest.raises(ValueError, match="non-finite value.*left unchanged"):
        if method == "merge_lora":
            merge_lora(model)
        else:
            getattr(layer, method)()
    assert torch.equal(layer.original_linear.weight, W) and not layer.merged
    assert isinstance(model[0], LoRALinear)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), y, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_a_refused_merge_can_be_retried_once_the_adapter_is_finite(dtype):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8, dtype=dtype), rank=2)
    B = torch.randn(8, 2)
    with torch.no_grad():
        layer.lora_B.copy_(B)
        layer.lora_B[1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    with torch.no_grad():
        layer.lora_B.copy_(B)
    x = torch.randn(3, 16).to(dtype)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer(x), y, rtol=2e-2, atol=2e-2)
