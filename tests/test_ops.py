"""lora_linear on the always-available "torch" backend, and the op's contract."""

import pytest
import torch
from helpers import make_inputs

import lora_kernels
from lora_kernels import backends


def test_eval_mode_applies_no_dropout_and_draws_no_seed():
    x, W, b, A, B, s = make_inputs(9, 12, 5, 3, torch.float32)
    state = torch.get_rng_state()
    y = lora_kernels.lora_linear(x, W, b, A, B, s, 0.5, training=False, backend="torch")
    assert torch.equal(torch.get_rng_state(), state), "eval mode drew from the generator"
    expected = lora_kernels.lora_linear_reference(x, W, b, A, B, s, 0.0)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)


def test_manual_seed_reproduces_and_consecutive_calls_differ():
    x, W, b, A, B, s = make_inputs(16, 40, 8, 4, torch.float32)
    torch.manual_seed(3)
    y1 = lora_kernels.lora_linear(x, W, b, A, B, s, 0.5, backend="torch")
    y2 = lora_kernels.lora_linear(x, W, b, A, B, s, 0.5, backend="torch")
    torch.manual_seed(3)
    y1_again = lora_kernels.lora_linear(x, W, b, A, B, s, 0.5, backend="torch")
    assert torch.equal(y1, y1_again)
    assert not torch.equal(y1, y2)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["nonreentrant", "reentrant"])
def test_checkpoint_recomputes_the_same_mask(use_reentrant):
    x, W, b, A, B, s = make_inputs(17, 30, 11, 5, torch.float64)

    def block(inp):
        return torch.tanh(lora_kernels.lora_linear(inp, W, b, A, B, s, 0.3, backend="torch"))

    def grads_of(run):
        # .backward() rather than autograd.grad: reentrant checkpointing needs it.
        for t in (x, A, B):
            t.grad = None
        torch.manual_seed(11)
        y = run(x)
        y.square().sum().backward()
        return y.detach(), [t.grad.clone() for t in (x, A, B)]

    y, grads = grads_of(block)
    y_ckpt, grads_ckpt = grads_of(
        lambda inp: torch.utils.checkpoint.checkpoint(block, inp, use_reentrant=use_reentrant)
    )
    assert torch.equal(y, y_ckpt)
    for g, g_ckpt in zip(grads, grads_ckpt, strict=True):
        torch.testing.assert_close(g_ckpt, g, rtol=1e-12, atol=1e-12)


def test_trainable_weight_gets_its_gradient_through_plain_ops():
    x, W, b, A, B, s = make_inputs(10, 12, 6, 2, torch.float64)
    W.requires_grad_()
    y = lora_kernels.lora_linear(x, W, b, A, B, s, 0.0)
    (gW,) = torch.autograd.grad(y.sum(), W)
    W_ref = W.detach().requires_grad_()
    (gW_ref,) = torch.autograd.grad(
        lora_kernels.lora_linear_reference(x, W_ref, b, A, B, s).sum(), W_ref
    )
    torch.testing.assert_close(gW, gW_ref)


def test_frozen_input_skips_grad_x():
    x, W, b, A, B, s = make_inputs(10, 12, 6, 2, torch.float32)
    x = x.detach()
    y = lora_kernels.lora_linear(x, W, b, A, B, s, 0.1, backend="torch")
    gA, gB = torch.autograd.grad(y.sum(), (A, B))
    assert gA.shape == A.shape and gB.shape == B.shape


def test_empty_batch_returns_empty_output_and_gradients():
    x, W, b, A, B, s = make_inputs(0, 12, 6, 2, torch.float32)
    y = lora_kernels.lora_linear(x, W, b, A, B, s, 0.1, backend="torch")
    assert y.shape == (0, 6)
    gA, gB = torch.autograd.grad(y.sum(), (A, B))
    assert torch.equal(gA, torch.zeros_like(A)) and torch.equal(gB, torch.zeros_like(B))


def test_autocast_behaves_like_linear():
    x, W, b, A, B, s = make_inputs(8, 16, 4, 2, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_kernels.lora_linear(x, W, b, A, B, s, backend="torch")
        y_linear = torch.nn.functional.linear(x, W, b)
    assert y.dtype == y_linear.dtype == torch.bfloat16
    gA, gx = torch.autograd.grad(y.float().sum(), (A, x))
    assert gA.dtype == torch.float32 and gx.dtype == torch.float32


def test_compile_fullgraph_matches_eager():
    x, W, b, A, B, s = make_inputs(12, 20, 7, 3, torch.float32, learnable_s=True)

    def step(inp):
        return lora_kernels.lora_linear(inp, W, b, A, B, s, 0.0).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss, loss_c = step(x), compiled(x)
    torch.testing.assert_close(loss_c, loss)
    grads = torch.autograd.grad(loss, (x, A, B, s))
    grads_c = torch.autograd.grad(compiled(x), (x, A, B, s))
    for g, gc in zip(grads, grads_c, strict=True):
        torch.testing.assert_close(gc, g)


def test_available_backends_reports_every_backend_with_a_reason():
    report = lora_kernels.available_backends()
    assert set(report) == {"triton", "cuda", "cpu", "torch"}
    for name, (usable, reason) in report.items():
        assert isinstance(usable, bool) and isinstance(reason, str) and reason, name
    assert report["torch"][0]


def test_unknown_backend_name_raises():
    x, W, b, A, B, s = make_inputs(4, 8, 3, 2, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        lora_kernels.lora_linear(x, W, b, A, B, s, backend="tpu")


def test_env_var_names_the_backend(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.resolve_backend("cpu")
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve_backend("cpu") == "torch"


def test_unusable_backend_raises_with_its_reason(monkeypatch):
    monkeypatch.setitem(backends._availability, "cuda", (False, "no CUDA device"))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        backends.resolve_backend("cuda", "cuda")


@pytest.mark.parametrize(
    "change,error,match",
    [
        (lambda a: a.update(x=a["x"][..., :-1]), ValueError, "in_features = 12.*got 11"),
        (
            lambda a: a.update(lora_A=a["lora_A"][:, :-1]),
            ValueError,
            r"lora_A must have shape \[R, 12\]",
        ),
        (
            lambda a: a.update(lora_B=a["lora_B"][:-1]),
            ValueError,
            r"lora_B must have shape \[5, 3\]",
        ),
        (lambda a: a.update(bias=a["bias"][:-1]), ValueError, r"bias must have shape \[5\]"),
        (lambda a: a.update(x=a["x"].to(torch.int32)), TypeError, "x must be a floating-point"),
        (lambda a: a.update(x=a["x"].to(torch.complex64)), TypeError, "x must be a floating-point"),
        (lambda a: a.update(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
        (lambda a: a.update(dropout_p=-0.1), ValueError, r"dropout_p must be a float in \[0, 1\)"),
        (lambda a: a.update(scaling="2"), TypeError, "scaling must be a float"),
        (lambda a: a.update(training="no"), TypeError, "training must be a bool, got 'no'"),
        (lambda a: a.update(scaling=float("nan")), ValueError, "scaling must be finite"),
        (
            lambda a: a.update(weight=a["weight"].double()),
            TypeError,
            "weight and bias must have x's dtype",
        ),
        (lambda a: a.update(x=a["x"].to("meta")), ValueError, "x on meta"),
    ],
    ids=[
        "x-last-dim",
        "A-shape",
        "B-shape",
        "bias-shape",
        "int-x",
        "complex-x",
        "p-one",
        "p-negative",
        "scaling-type",
        "training-str",
        "scaling-nan",
        "weight-dtype",
        "devices",
    ],
)
def test_bad_input_raises_clear_error(change, error, match):
    x, W, b, A, B, s = make_inputs(4, 12, 5, 3, torch.float32)
    args = dict(
        x=x.detach(),
        weight=W,
        bias=b.detach(),
        lora_A=A.detach(),
        lora_B=B.detach(),
        scaling=s,
        dropout_p=0.1,
    )
    change(args)
    with pytest.raises(error, match=match):
        lora_kernels.lora_linear(**args)


COLD_COMPILE = """
import torch
from torch import nn
import lora_kernels as lk

torch.manual_seed(0)
model = nn.Sequential(
    lk.LoRALinear(nn.Linear(16, 8), rank=4, alpha=8),
    nn.ReLU(),
    lk.LoRALinear(nn.Linear(8, 4), rank=2, alpha=4),
)
for layer in (model[0], model[2]):
    nn.init.normal_(layer.lora_B)
x = torch.randn(5, 16)
# The first call of the process is the compiled one: nothing is loaded or cached yet.
compiled = torch.compile(model, fullgraph=True)
y_compiled = compiled(x)
y_compiled.sum().backward()
grad_compiled = model[0].lora_A.grad.clone()
model.zero_grad()
y = model(x)
y.sum().backward()
torch.testing.assert_close(y_compiled, y)
torch.testing.assert_close(grad_compiled, model[0].lora_A.grad)
print("ok")
"""


def test_compile_fullgraph_from_a_cold_process_matches_eager():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", COLD_COMPILE], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_autocast_accepts_a_bf16_input_from_an_earlier_autocast_layer():
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lora_kernels.apply_lora(model, rank=2, alpha=4)
    for _, layer in lora_kernels.lora_layers(model):
        nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    expected = model[2].original_linear(torch.relu(model[0](x)))
    expected = (
        expected
        + model[2].scaling * (torch.relu(model[0](x)) @ model[2].lora_A.t()) @ model[2].lora_B.t()
    )
    assert (y.float() - expected).norm() / expected.norm() < 2e-2


@pytest.mark.parametrize("through", ["lora_linear", "LoRALinear"])
def test_fallback_warning_points_at_the_callers_line(monkeypatch, through):
    """With the preferred CPU backend unusable, the automatic choice warns once, and the
    warning names the user's file, not a line inside lora_kernels or torch."""
    real = backends.availability
    monkeypatch.setattr(
        backends,
        "availability",
        lambda name: (False, "made unusable by the test") if name == "cpu" else real(name),
    )
    monkeypatch.setattr(backends, "_warned_fallback", set())
    layer = lora_kernels.LoRALinear(torch.nn.Linear(6, 5), rank=2)
    x = torch.randn(3, 6)
    with pytest.warns(UserWarning, match="'cpu' is not usable") as record:
        if through == "lora_linear":
            lora_kernels.lora_linear(x, layer.original_linear.weight, None, layer.lora_A,
                                     layer.lora_B, 1.0, 0.0)  # fmt: skip
        else:
            layer(x)
    assert [w.filename for w in record] == [__file__]
