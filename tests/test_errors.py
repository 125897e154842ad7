"""Bad input is refused with a clear error: the argument, what was expected, what came.

Completes the error tests of test_ops.py, test_layer.py and test_model.py (not repeated
here: x's last dim, the lora_A/lora_B/bias shapes, int32 and complex64 x, p = 1 and
p < 0, a str or NaN scaling, a float64 weight, x on another device, an unknown backend
name for the op and LoRALinear, the LORA_KERNELS_BACKEND variable, an unusable backend;
rank/alpha/dropout/init/backend/use_rslora of LoRALinear; rank 0, NaN alpha, dropout 1,
svd rank, target_modules types and regexes, a target that matches nothing or a
non-Linear, and the missing/unexpected/misshapen keys of load_lora_state_dict).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis_profiles import backend_device_params
from torch import nn

import lora_kernels
from lora_kernels import LoRALinear, apply_lora, load_lora_state_dict, lora_state_dict

BACKEND_RE = r"\('triton', 'cuda', 'cpu', 'torch'\)"


def operands():
    """x [4, 12], weight [5, 12], bias [5], lora_A [3, 12], lora_B [5, 3]: K=12, N=5, R=3."""
    g = torch.Generator().manual_seed(0)
    shapes = {"x": (4, 12), "weight": (5, 12), "bias": (5,), "lora_A": (3, 12), "lora_B": (5, 3)}
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


OP_BAD_INPUTS = [
    # (change to the arguments, error, message: the argument, the expected, the received)
    pytest.param(
        {"x": [[1.0] * 12]}, TypeError, r"x must be a torch.Tensor, got list", id="x-list"
    ),
    pytest.param(
        {"x": torch.tensor(1.0)},
        ValueError,
        r"x must have at least one dimension \(its last is in_features\), got a 0-dim",
        id="x-0dim",
    ),
    *[
        pytest.param(
            {"x": dtype},
            TypeError,
            rf"x must be a floating-point tensor \(float32, float16, bfloat16 or float64\), "
            rf"got {dtype}",
            id=f"x-{str(dtype)[6:]}",
        )
        for dtype in (torch.bool, torch.int64, torch.uint8, torch.complex128, torch.float8_e4m3fn)
    ],
    pytest.param({"weight": (12,)}, ValueError, r"weight must be 2-D, got shape \[12\]", id="W-1d"),
    pytest.param(
        {"weight": torch.int32},
        TypeError,
        r"weight must be a floating-point.*got torch.int32",
        id="W-int",
    ),
    pytest.param(
        {"weight": (6, 11)},
        ValueError,
        r"x's last dimension must equal in_features = 11 \(weight is \[6, 11\]\), got 12",
        id="W-in_features",
    ),
    pytest.param(
        {"lora_A": (1, 3, 12)},
        ValueError,
        r"lora_A must be 2-D, got shape \[1, 3, 12\]",
        id="A-3d",
    ),
    pytest.param(
        {"lora_A": torch.complex64},
        TypeError,
        r"lora_A must be a floating-point.*complex64",
        id="A-complex",
    ),
    pytest.param(
        {"lora_B": (5, 4)},
        ValueError,
        r"lora_B must have shape \[5, 3\] \(out_features, rank of lora_A\), got \[5, 4\]",
        id="B-rank",
    ),
    pytest.param(
        {"weight": (6, 12)},
        ValueError,
        r"lora_B must have shape \[6, 3\] \(out_features, rank of lora_A\), got \[5, 3\]",
        id="W-out_features",
    ),
    pytest.param(
        {"lora_A": (0, 12), "lora_B": (5, 0)},
        ValueError,
        r"rank \(lora_A.shape\[0\]\) must be at least 1, got 0",
        id="rank0",
    ),
    pytest.param({"bias": (1, 5)}, ValueError, r"bias must be 1-D, got shape \[1, 5\]", id="b-2d"),
    pytest.param(
        {"lora_A": torch.float16, "lora_B": torch.float16},
        TypeError,
        r"lora_A and lora_B must have x's dtype torch.float32 or float32, got torch.float16",
        id="AB-half-on-fp32",
    ),
    pytest.param(
        {"lora_B": torch.float64},
        TypeError,
        r"lora_A and lora_B must share a dtype, got torch.float32 and torch.float64",
        id="AB-mixed",
    ),
    pytest.param(
        {"bias": torch.float16},
        TypeError,
        r"weight and bias must have x's dtype torch.float32.*bias torch.float16",
        id="b-dtype",
    ),
    pytest.param(
        {"scaling": float("inf")}, ValueError, r"scaling must be finite, got inf", id="s-inf"
    ),
    pytest.param(
        {"scaling": float("-inf")}, ValueError, r"scaling must be finite, got -inf", id="s-neginf"
    ),
    pytest.param(
        {"scaling": True},
        TypeError,
        r"scaling must be a float or a 0-dim tensor, got True",
        id="s-bool",
    ),
    pytest.param(
        {"scaling": None},
        TypeError,
        r"scaling must be a float or a 0-dim tensor, got None",
        id="s-None",
    ),
    pytest.param(
        {"scaling": torch.tensor(2)},
        TypeError,
        r"scaling must be a floating-point.*int64",
        id="s-int-tensor",
    ),
    pytest.param(
        {"scaling": torch.ones(2)},
        ValueError,
        r"scaling must be a 0-dim tensor or a float, got \[2\]",
        id="s-2-elements",
    ),
    *[
        pytest.param(
            {"dropout_p": p},
            error,
            rf"dropout_p must be a float in \[0, 1\), got {text}",
            id=f"p-{name}",
        )
        for p, error, text, name in [
            (float("nan"), ValueError, "nan", "nan"),
            (float("inf"), ValueError, "inf", "inf"),
            (1.5, ValueError, "1.5", "1.5"),
            (True, TypeError, r"True \(bool\)", "bool"),
            (None, TypeError, r"None \(NoneType\)", "None"),
            ("0.1", TypeError, r"'0.1' \(str\)", "str"),
        ]
    ],
    *[
        pytest.param(
            {name: "meta"},
            ValueError,
            rf"all tensors must be on one device, got .*{name} on meta",
            id=f"{name}-on-meta",
        )
        for name in ("weight", "bias", "lora_A", "lora_B", "scaling")
    ],
    *[
        pytest.param(
            {"backend": name},
            ValueError,
            rf"backend must be one of {BACKEND_RE} or None, got {got}",
            id=f"backend-{text}",
        )
        for name, got, text in [("", "''", "empty"), ("TORCH", "'TORCH'", "case"), (3, "3", "int")]
    ],
]


def _apply(args: dict, change: dict) -> None:
    """Replace arguments: a shape makes a new tensor, a dtype or "meta" converts one."""
    for name, value in change.items():
        if name == "scaling" and value == "meta":
            args[name] = torch.tensor(0.5, device="meta")
        elif isinstance(value, tuple):
            args[name] = torch.randn(value)
        elif isinstance(value, torch.dtype):
            args[name] = args[name].to(value)
        elif value == "meta":
            args[name] = args[name].to("meta")
        else:
            args[name] = value


@pytest.mark.parametrize("change, error, message", OP_BAD_INPUTS)
def test_lora_linear_refuses_bad_input_naming_argument_expected_and_received(
    change, error, message
):
    args = {**operands(), "scaling": 0.5, "dropout_p": 0.1, "backend": None}
    _apply(args, change)
    with pytest.raises(error, match=message):
        lora_kernels.lora_linear(**args)


LAYER_BAD_INPUTS = [
    pytest.param(
        torch.int64, TypeError, r"x must be a floating-point tensor .*got torch.int64", id="int"
    ),
    pytest.param(
        torch.complex64, TypeError, r"x must be a floating-point .*complex64", id="complex"
    ),
    pytest.param((), ValueError, r"x must have at least one dimension.*0-dim", id="0dim"),
    pytest.param(
        (2, 3, 11), ValueError, r"in_features = 12 \(weight is \[5, 12\]\), got 11", id="lead-K"
    ),
]


@pytest.mark.parametrize("x_change, error, message", LAYER_BAD_INPUTS)
def test_lora_linear_layer_refuses_bad_input(x_change, error, message):
    layer = LoRALinear(nn.Linear(12, 5), rank=3)
    if isinstance(x_change, tuple):
        x = torch.randn(x_change)
    else:
        x = torch.randn(4, 12).to(x_change)
    with pytest.raises(error, match=message):
        layer(x)


LAYER_BAD_ARGUMENTS = [
    pytest.param(
        {"rank": "8"}, TypeError, r"rank must be an int >= 1, got '8' \(str\)", id="rank-str"
    ),
    pytest.param({"rank": None}, TypeError, r"rank must be an int >= 1, got None", id="rank-None"),
    pytest.param(
        {"alpha": 1j}, TypeError, r"alpha must be a finite number > 0, got 1j", id="alpha-complex"
    ),
    pytest.param(
        {"alpha": True}, TypeError, r"alpha must be a finite number > 0, got True", id="alpha-bool"
    ),
    pytest.param(
        {"dropout": float("nan")},
        ValueError,
        r"dropout must be a float in \[0, 1\), got nan",
        id="dropout-nan",
    ),
    pytest.param(
        {"learnable_scaling": 1},
        TypeError,
        r"learnable_scaling must be a bool, got 1",
        id="learnable_scaling-int",
    ),
    pytest.param(
        {"init": None},
        ValueError,
        r"init must be one of \('kaiming', 'gaussian', 'svd'\), "
        r"got None",
        id="init-None",
    ),
]


@pytest.mark.parametrize("kwargs, error, message", LAYER_BAD_ARGUMENTS)
def test_lora_linear_layer_refuses_bad_arguments_and_leaves_the_linear_alone(
    kwargs, error, message
):
    base = nn.Linear(12, 5)
    with pytest.raises(error, match=message):
        LoRALinear(base, **kwargs)
    assert base.weight.requires_grad and base.bias.requires_grad


def test_lora_linear_layer_refuses_a_missing_linear_and_a_non_bool_enabled():
    with pytest.raises(
        TypeError, match="original_linear_layer must be a torch.nn.Linear, got NoneType"
    ):
        LoRALinear(None)
    layer = LoRALinear(nn.Linear(12, 5), rank=3)
    with pytest.raises(TypeError, match=r"enabled must be a bool, got 1 \(int\)"):
        layer.enabled = 1
    assert layer.enabled


@pytest.mark.parametrize("device_type, backend", backend_device_params())
@pytest.mark.parametrize("wrt", ["x", "lora_A", "lora_B"])
def test_double_backward_raises_not_supported_instead_of_a_wrong_result(device_type, backend, wrt):
    args = {k: v.to(device_type) for k, v in operands().items()}
    args[wrt].requires_grad_()
    y = lora_kernels.lora_linear(**args, scaling=0.5, dropout_p=0.1, backend=backend)
    (first,) = torch.autograd.grad(y.square().sum(), args[wrt], retain_graph=True)
    # create_graph=True alone is served: the first-order gradient, the same numbers.
    (grad,) = torch.autograd.grad(y.square().sum(), args[wrt], create_graph=True)
    assert torch.equal(grad.detach(), first) and first.abs().max() > 0
    # A second-order gradient through the op is refused when it is taken.
    with pytest.raises(RuntimeError, match=r"double backward .*lora_linear is not supported"):
        torch.autograd.grad(grad.square().sum(), args[wrt])


@pytest.mark.parametrize("device_type, backend", backend_device_params())
def test_create_graph_through_the_layer_gives_first_order_gradients(device_type, backend):
    """A trainer that passes create_graph=True for another reason (a gradient penalty on
    other parameters) can train; a penalty on the adapter's own gradient is refused."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 5, device=device_type), rank=3, backend=backend)
    with torch.no_grad():
        layer.lora_B.normal_()
    head = nn.Linear(5, 1, device=device_type)
    x = torch.randn(4, 12, device=device_type)
    expected = torch.autograd.grad(head(layer(x)).sum(), [layer.lora_A, layer.lora_B])
    loss = head(layer(x)).sum()
    grad_A, grad_B = torch.autograd.grad(loss, [layer.lora_A, layer.lora_B], create_graph=True)
    assert torch.equal(grad_A.detach(), expected[0]) and torch.equal(grad_B.detach(), expected[1])
    # A penalty on another parameter's gradient, taken through the op's forward: served.
    loss = head(layer(x)).square().sum()
    grad_head, grad_A = torch.autograd.grad(loss, [head.weight, layer.lora_A], create_graph=True)
    grad_head.square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().max() > 0
    with pytest.raises(RuntimeError, match="double backward.*not supported"):
        grad_A.square().sum().backward()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 5))


APPLY_BAD_ARGUMENTS = [
    pytest.param(
        {"rank": 2.0}, TypeError, r"rank must be an int >= 1, got 2.0 \(float\)", id="rank-float"
    ),
    pytest.param({"rank": -1}, ValueError, r"rank must be an int >= 1, got -1", id="rank-neg"),
    pytest.param(
        {"alpha": 0}, ValueError, r"alpha must be a finite number > 0, got 0", id="alpha0"
    ),
    pytest.param(
        {"alpha": float("inf")},
        ValueError,
        r"alpha must be a finite number > 0, got inf",
        id="alpha-inf",
    ),
    pytest.param(
        {"alpha": "4"},
        TypeError,
        r"alpha must be a finite number > 0, got '4' \(str\)",
        id="alpha-str",
    ),
    pytest.param(
        {"dropout": -0.5},
        ValueError,
        r"dropout must be a float in \[0, 1\), got -0.5",
        id="dropout-neg",
    ),
    pytest.param(
        {"dropout": "0.1"},
        TypeError,
        r"dropout must be a float in \[0, 1\), got '0.1'",
        id="dropout-str",
    ),
    pytest.param({"init": "xavier"}, ValueError, r"init must be one of .*got 'xavier'", id="init"),
    pytest.param(
        {"backend": "nope"},
        ValueError,
        rf"backend must be one of {BACKEND_RE} or None, "
        r"got 'nope'",
        id="backend",
    ),
    pytest.param(
        {"use_rslora": "yes"}, TypeError, r"use_rslora must be a bool, got 'yes'", id="rslora"
    ),
    pytest.param(
        {"learnable_scaling": 1},
        TypeError,
        r"learnable_scaling must be a bool, got 1",
        id="learnable_scaling",
    ),
    pytest.param(
        {"target_modules": []},
        ValueError,
        r"target_modules=\[\] .*matches no nn.Linear.*"
        r"\['0', '2'\]",
        id="target-empty-list",
    ),
    pytest.param(
        {"target_modules": ["0", ""]},
        TypeError,
        r"target_modules entries must be non-empty "
        r"module names \(str\), got ''",
        id="target-empty-name",
    ),
    pytest.param(
        {"exclude_modules": ".*"},
        ValueError,
        r"exclude_modules='\.\*'\) matches no "
        r"nn.Linear",
        id="exclude-everything",
    ),
    pytest.param(
        {"target_modules": ["1"]},
        TypeError,
        r"target_modules matches '1', a ReLU; only "
        r"torch.nn.Linear",
        id="target-ReLU",
    ),
]


@pytest.mark.parametrize("kwargs, error, message", APPLY_BAD_ARGUMENTS)
def test_apply_lora_refuses_bad_arguments_and_leaves_the_model_unchanged(kwargs, error, message):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    kwargs = {"rank": 2, "alpha": 4, **kwargs}
    with pytest.raises(error, match=message):
        apply_lora(model, **kwargs)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_apply_lora_refuses_a_model_that_is_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got OrderedDict"):
        apply_lora(mlp().state_dict(), 2, 4)


def adapted(in_features=12, rank=2, learnable_scaling=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(in_features, 24), nn.ReLU(), nn.Linear(24, 5))
    return apply_lora(model, rank, 4, learnable_scaling=learnable_scaling)


@pytest.mark.parametrize(
    "source, message",
    [
        pytest.param(
            adapted(rank=4),
            r"state_dict\['0.lora_A'\] has shape \[4, 12\], but the model's 0.lora_A has shape "
            r"\[2, 12\]",
            id="other-rank",
        ),
        pytest.param(
            adapted(in_features=10),
            r"state_dict\['0.lora_A'\] has shape \[2, 10\], but the model's 0.lora_A has shape "
            r"\[2, 12\]",
            id="other-in_features",
        ),
    ],
)
def test_loading_an_adapter_that_does_not_fit_names_the_module_and_both_shapes(source, message):
    model = adapted()
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    with pytest.raises(ValueError, match=message):
        load_lora_state_dict(model, lora_state_dict(source))
    for key, value in lora_state_dict(model).items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused load"


def test_loading_a_misshapen_scaling_or_a_non_dict_is_refused():
    model = adapted(learnable_scaling=True)
    state = {k: v.clone() for k, v in lora_state_dict(model).items()}
    state["2.scaling"] = torch.tensor([0.5])
    with pytest.raises(
        ValueError, match=r"state_dict\['2.scaling'\] has shape \[1\], but .* has shape \[\]"
    ):
        load_lora_state_dict(model, state)
    with pytest.raises(TypeError, match="state_dict must be a dict, got list"):
        load_lora_state_dict(model, list(state.items()))


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (the meta-device cases stand in)"
)
@pytest.mark.parametrize("name", ["x", "weight", "bias", "lora_A", "lora_B"])
def test_one_tensor_on_cuda_and_the_others_on_cpu_is_refused(name):
    args = {**operands(), "scaling": 0.5}
    args[name] = args[name].cuda()
    with pytest.raises(
        ValueError, match=rf"all tensors must be on one device, got .*{name} on cuda"
    ):
        lora_kernels.lora_linear(**args)


@pytest.mark.parametrize("trainable_weight", [False, True], ids=["frozen-W", "trainable-W"])
def test_an_unusable_backend_asked_for_by_name_raises_with_its_reason(
    trainable_weight, monkeypatch
):
    from lora_kernels import backends

    monkeypatch.setitem(backends._availability, "cuda", (False, "no CUDA device here"))
    args = operands()
    args["weight"].requires_grad_(trainable_weight)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not usable: no CUDA device here"):
        lora_kernels.lora_linear(**args, scaling=0.5, backend="cuda")
