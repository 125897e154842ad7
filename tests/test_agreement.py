"""Backends agree: the same seed gives the same dropout mask bit for bit, outputs equal
within tolerance, and a small model trained 20 steps reaches the same loss."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import DTYPE_IDS, REL_TOL, assert_close, rel_error
from hypothesis_profiles import backend_device_params
from torch import nn

import lora_kernels
import lora_kernels.layer
from lora_kernels import apply_lora, lora_layers
from lora_kernels.ops import SEED_BOUND
from lora_kernels.reference import dropout_keep_mask, dropout_scale, lora_linear_reference

BACKENDS = backend_device_params()


def drawn_seed(seed: int) -> torch.Tensor:
    """The seed lora_linear draws right after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    return torch.randint(SEED_BOUND, (), dtype=torch.int64)


# (M, K, p). K not a multiple of 4 ends a row mid-group; M=130 spans several row blocks
# with a tail. Thresholds below, at and above 2**31: a signed compare of the Philox word
# with T = floor(p * 2**32) goes wrong from p = 0.5 on.
MASK_CASES = [
    pytest.param(1, 1, 0.5, id="M1-K1-p0.5"),
    pytest.param(37, 13, 0.1, id="M37-K13-p0.1"),
    pytest.param(37, 13, 0.5, id="M37-K13-p0.5"),
    pytest.param(37, 13, 0.9, id="M37-K13-p0.9"),
    pytest.param(130, 24, 0.75, id="M130-K24-p0.75"),
]


@pytest.mark.parametrize("device_type, backend", BACKENDS)
@pytest.mark.parametrize("M, K, p", MASK_CASES)
def test_same_seed_gives_the_reference_mask_bit_for_bit_in_forward_and_backward(
    device_type, backend, M, K, p
):
    # W = 0, A = B = I, s = 1, x = 1: y = D(x) = keep / (1 - p), dX = D(dY B A) = D(1)
    # = y as well, dA = 1^T D(x) and dB = 1^T U count the kept elements per column.
    x = torch.ones(M, K, device=device_type, requires_grad=True)
    weight = torch.zeros(K, K, device=device_type)
    lora_A = torch.eye(K, device=device_type).requires_grad_()
    lora_B = torch.eye(K, device=device_type).requires_grad_()
    torch.manual_seed(123)
    y = lora_kernels.lora_linear(x, weight, None, lora_A, lora_B, 1.0, p, backend=backend)
    keep = dropout_keep_mask(drawn_seed(123), M, K, p, device=device_type)
    scale = dropout_scale(p)

    assert torch.equal(y != 0, keep), f"forward mask differs in {int(((y != 0) ^ keep).sum())}"
    torch.testing.assert_close(y[keep], torch.full_like(y[keep], scale), rtol=1e-3, atol=0)
    grad_x, grad_A, grad_B = torch.autograd.grad(y, (x, lora_A, lora_B), torch.ones_like(y))
    assert torch.equal(grad_x != 0, keep), "dX's mask differs from forward's"
    kept_per_column = keep.sum(0).double()
    # dA[r, k] = kept in column k; dB[n, r] = kept in column r (U = D(x) as A = I).
    for name, grad in (("lora_A", grad_A), ("lora_B", grad_B)):
        wrong = int(((grad.double() / scale).round() != kept_per_column).sum())
        assert wrong == 0, f"grad of {name}: {wrong} columns count other kept elements"


def _backend_pairs():
    """pytest params (device_type, backend_a, backend_b) for each pair of usable backends."""
    usable = {}
    for param in BACKENDS:
        if not param.marks:
            device_type, backend = param.values
            usable.setdefault(device_type, []).append(backend)
    pairs = [
        pytest.param(device, a, b, id=f"{device}-{a}-vs-{b}")
        for device, names in usable.items()
        for a, b in itertools.combinations(names, 2)
    ]
    if not pairs:
        reason = f"fewer than two usable backends on any device ({usable}): nothing to compare"
        pairs = [pytest.param(None, None, None, id="pairs", marks=pytest.mark.skip(reason=reason))]
    return pairs


@pytest.mark.parametrize("device_type, backend_a, backend_b", _backend_pairs())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_every_pair_of_backends_gives_equal_outputs_and_gradients(
    device_type, backend_a, backend_b, dtype
):
    M, K, N, R, p = 37, 45, 29, 6, 0.2
    g = torch.Generator().manual_seed(8)

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(dt).to(device_type)

    x, weight, bias = rand(3, M, K), rand(N, K, scale=K**-0.5), rand(N)
    lora_A, lora_B = rand(R, K, scale=K**-0.5, dt=torch.float32), rand(N, R, dt=torch.float32)
    scaling = torch.tensor(1.5, device=device_type)
    grad_y = rand(3, M, N)
    leaves = [x, bias, lora_A, lora_B, scaling]
    results = []
    for backend in (backend_a, backend_b):
        args = [t.detach().clone().requires_grad_() for t in leaves]
        torch.manual_seed(99)
        y = lora_kernels.lora_linear(args[0], weight, *args[1:], p, backend=backend)
        results.append((y, *torch.autograd.grad(y, args, grad_y)))
    # Each is within tol of the exact result, hence within 2 tol of the other.
    names = ("output", "grad of x", "grad of bias", "grad of lora_A", "grad of lora_B", "scaling")
    for name, a, b in zip(names, *results, strict=True):
        error = rel_error(a, b)
        tol = 2 * max(REL_TOL[dtype], REL_TOL[a.dtype])
        assert error <= tol, f"{name}: {backend_a} vs {backend_b} differ by {error:.2e} > {tol:.0e}"


def reference_lora_linear(
    x, weight, bias, lora_A, lora_B, scaling, dropout_p=0.0, training=True, backend=None
):
    """lora_linear's signature on the reference, drawing the seed exactly as the op does."""
    p = dropout_p if training else 0.0
    seed = torch.randint(SEED_BOUND, (), dtype=torch.int64) if p > 0 else 0
    return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling, p, True, seed)


def train_losses(backend: str, device_type: str, steps: int = 20) -> tuple[list[float], dict]:
    """Loss per step of a two-layer MLP with LoRA (dropout, learnable scaling), SGD."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8)).to(device_type)
    apply_lora(model, 4, 8, dropout=0.1, learnable_scaling=True, backend=backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=g).to(device_type)
    target = torch.randn(32, 8, generator=g).to(device_type)
    params = [p for p in model.parameters() if p.requires_grad]
    # SGD, not Adam: Adam normalizes the gradient, hiding a gradient off by a factor.
    optimizer = torch.optim.SGD(params, lr=0.2, momentum=0.5)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, {name: layer.lora_B.detach().cpu() for name, layer in lora_layers(model)}


@pytest.mark.parametrize("device_type, backend", BACKENDS)
def test_a_model_trained_20_steps_reaches_the_reference_loss(device_type, backend, monkeypatch):
    losses, lora_B = train_losses(backend, device_type)
    with monkeypatch.context() as patch:
        patch.setattr(lora_kernels.layer, "lora_linear", reference_lora_linear)
        reference_losses, reference_B = train_losses(backend, device_type)
    assert reference_losses[-1] < 0.9 * reference_losses[0], "the run must actually train"
    for step, (loss, expected) in enumerate(zip(losses, reference_losses, strict=True)):
        assert abs(loss - expected) <= 1e-4 * expected, f"step {step}: {loss} vs {expected}"
    for name, B in lora_B.items():
        assert_close(B, reference_B[name], torch.float32, f"{name}.lora_B after 20 steps")
