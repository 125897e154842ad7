"""torch.func transforms and forward-mode AD through `lora_linear`: served by the
composition of ATen ops (the fused ops have reverse-mode rules only), with the mask the
fused op draws for the same seed; never silently zero tangents."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import assert_close, make_inputs

import lora_kernels
from lora_kernels import ops, reference

F32 = torch.float32
M, K, N, R = 13, 21, 11, 5


def expected_tangent(x, weight, A, B, s, p, seed, tx, tA, tB, ts):
    """d/dt of X W^T + s (D(X) A^T) B^T along (tx, tA, tB, ts), in float64, where D is
    the mask of `seed` scaled by 1 / (1 - p)."""
    d = lambda t: (
        t.double()
        * (reference.dropout_keep_mask(seed, M, K, p).double() / (1 - p) if p > 0 else 1.0)
    )
    W, A, B, s = weight.double(), A.double(), B.double(), float(s)
    u, tu = d(x) @ A.T, d(tx) @ A.T + d(x) @ tA.double().T
    return tx.double() @ W.T + s * (tu @ B.T + u @ tB.double().T) + float(ts) * (u @ B.T)


def inputs():
    x, weight, b, A, B, s = make_inputs(M, K, N, R, F32, learnable_s=True)
    g = torch.Generator().manual_seed(5)
    tangents = [torch.randn(t.shape, generator=g, dtype=F32) for t in (x, A, B)]
    return (x.detach(), weight, b.detach(), A.detach(), B.detach(), s.detach(), *tangents)


def seed_after(manual_seed: int) -> torch.Tensor:
    torch.manual_seed(manual_seed)
    return ops.draw_seed(torch.device("cpu"))


def fused_output(x, weight, b, A, B, s, p, manual_seed):
    torch.manual_seed(manual_seed)
    return lora_kernels.lora_linear(x, weight, b, A, B, s, p)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_jvp_gives_the_tangent_in_x_A_B_and_s_with_the_fused_mask(p):
    x, weight, b, A, B, s, tx, tA, tB = inputs()
    ts = torch.tensor(0.3)

    def f(x, A, B, s):
        return lora_kernels.lora_linear(x, weight, b, A, B, s, p)

    torch.manual_seed(7)
    y, tangent = torch.func.jvp(f, (x, A, B, s), (tx, tA, tB, ts))
    assert_close(y, fused_output(x, weight, b, A, B, s, p, 7), F32, "jvp primal")
    expected = expected_tangent(x, weight, A, B, s, p, seed_after(7), tx, tA, tB, ts)
    assert tangent.abs().max() > 0
    assert_close(tangent, expected, F32, "jvp tangent")


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_forward_ad_dual_tensors_carry_the_tangent(p):
    x, weight, b, A, B, s, tx, tA, tB = inputs()
    torch.manual_seed(9)
    with fwAD.dual_level():
        y = lora_kernels.lora_linear(
            fwAD.make_dual(x, tx), weight, b, fwAD.make_dual(A, tA), B, s, p
        )
        tangent = fwAD.unpack_dual(y).tangent
    zero = torch.zeros_like(B)
    expected = expected_tangent(x, weight, A, B, s, p, seed_after(9), tx, tA, zero, 0.0)
    assert_close(tangent, expected, F32, "forward-AD tangent")


@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
def test_func_grad_and_jacrev_match_autograd_through_the_fused_op(p):
    x, weight, b, A, B, s, *_ = inputs()
    A_, B_ = A.clone().requires_grad_(), B.clone().requires_grad_()
    fused_output(x, weight, b, A_, B_, s, p, 3).square().sum().backward()

    def loss(A, B):
        return lora_kernels.lora_linear(x, weight, b, A, B, s, p).square().sum()

    torch.manual_seed(3)
    dA, dB = torch.func.grad(loss, argnums=(0, 1))(A, B)
    assert_close(dA, A_.grad, F32, "func.grad dA")
    assert_close(dB, B_.grad, F32, "func.grad dB")
    v = torch.randn(M, N, generator=torch.Generator().manual_seed(8))
    A_.grad = None
    (fused_output(x, weight, b, A_, B, s, p, 3) * v).sum().backward()
    torch.manual_seed(3)
    jac = torch.func.jacrev(lambda A: lora_kernels.lora_linear(x, weight, b, A, B, s, p))(A)
    assert jac.shape == (M, N, R, K)
    assert_close((jac * v[:, :, None, None]).sum(dim=(0, 1)), A_.grad, F32, "jacrev")


def test_vmap_of_grad_gives_per_sample_gradients():
    x, weight, b, A, B, s, *_ = inputs()

    def loss(A, xi):
        return lora_kernels.lora_linear(xi, weight, b, A, B, s, 0.0).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(A, x)
    for i in (0, M // 2, M - 1):
        A_ = A.clone().requires_grad_()
        loss(A_, x[i : i + 1]).backward()
        assert_close(per_sample[i], A_.grad, F32, f"per-sample dA {i}")


def test_vmap_with_dropout_follows_torchs_randomness_rule():
    x, weight, b, A, B, s, *_ = inputs()

    def f(xi):
        return lora_kernels.lora_linear(xi, weight, b, A, B, s, 0.1)

    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(f)(x)
    torch.manual_seed(4)
    same = torch.func.vmap(f, randomness="same")(x.unsqueeze(1)).squeeze(1)
    assert same.shape == (M, N) and torch.isfinite(same).all()


def test_composition_is_chosen_only_under_a_transform_or_forward_ad():
    assert ops.composition_needed() is None
    seen = []
    torch.func.grad(lambda t: (seen.append(ops.composition_needed()), t.sum())[1])(torch.ones(2))
    with fwAD.dual_level():
        seen.append(ops.composition_needed())
    assert seen == ["a torch.func transform", "forward-mode AD (torch.autograd.forward_ad)"]
    assert ops.composition_needed() is None


def test_func_grad_over_a_patched_peft_model_matches_peft():
    peft = pytest.importorskip("peft", reason="peft is not installed")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.Tanh(), torch.nn.Linear(N, 3))
    config = peft.LoraConfig(r=R, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False)
    plain = peft.get_peft_model(base, config)
    patched = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(K, N), torch.nn.Tanh(), torch.nn.Linear(N, 3)),
        config,
    )
    patched.load_state_dict(plain.state_dict())
    report = lora_kernels.patch_peft(patched)
    assert len(report.patched) == 2
    x = torch.randn(M, K)

    def grads(model):
        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

        def loss(params):
            return torch.func.functional_call(model, params, (x,)).square().sum()

        return torch.func.grad(loss)(params)

    expected, got = grads(plain), grads(patched)
    assert expected.keys() == got.keys() and len(got) == 4
    for name in got:
        assert_close(got[name], expected[name], F32, name)
