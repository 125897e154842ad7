"""LoRALinear: forward and gradients against the reference, init, merge, errors, state."""

import copy
import math
import pickle

import pytest
import torch
from helpers import DTYPE_IDS, REL_TOL, assert_close, rel_error
from torch import nn

from lora_kernels import LoRALinear
from lora_kernels.reference import lora_linear_reference


def make_layer(K, N, R, dtype=torch.float32, *, bias=True, seed=0, **kwargs):
    """A LoRALinear on a random nn.Linear, with a random (non-zero) lora_B.

    B is scaled so that the LoRA branch is about as large as the base output: a
    wrong branch then moves the output well beyond the tolerance.
    """
    torch.manual_seed(seed)
    base = nn.Linear(K, N, bias=bias).to(dtype)
    kwargs.setdefault("alpha", 2.0 * R)
    layer = LoRALinear(base, rank=R, **kwargs)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(N, R) / (layer._scaling_value() * math.sqrt(R)))
    return layer


def rand_x(shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def reference_and_grads(layer, x, p, training, seed, grad_y, wrt):
    """Float64 reference output and gradients for the layer's current values."""
    W = layer.original_linear.weight
    b = layer.original_linear.bias
    tensors = {"x": x, "weight": W, "bias": b, "lora_A": layer.lora_A, "lora_B": layer.lora_B}
    tensors["scaling"] = layer.scaling if isinstance(layer.scaling, torch.Tensor) else None
    up = {
        k: None if t is None else t.detach().double().requires_grad_(k in wrt)
        for k, t in tensors.items()
    }
    s = up["scaling"] if up["scaling"] is not None else layer.scaling
    y64 = lora_linear_reference(
        up["x"], up["weight"], up["bias"], up["lora_A"], up["lora_B"], s, p, training, seed
    )
    grads = torch.autograd.grad(y64, [up[k] for k in wrt], grad_y.double())
    return y64, dict(zip(wrt, grads, strict=True))


CASES = [
    # lead dims + (M, K, N, R), learnable scaling and a trainable bias in some cases
    pytest.param((63, 70), 33, 7, True, id="M63-K70-N33-R7-learnable_s-bias_grad"),
    pytest.param((3, 21, 70), 33, 7, False, id="x3x21-K70-N33-R7"),
    pytest.param((1, 16), 5, 1, True, id="M1-K16-N5-R1-learnable_s-bias_grad"),
]


@pytest.mark.parametrize("x_shape, N, R, learnable", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_and_gradients_match_reference(x_shape, N, R, learnable, dtype, p, training):
    K = x_shape[-1]
    layer = make_layer(K, N, R, dtype, dropout=p, learnable_scaling=learnable, backend="torch")
    if learnable:
        layer.original_linear.bias.requires_grad_(True)
    layer.train(training)
    x = rand_x(x_shape, dtype).requires_grad_()

    torch.manual_seed(1234)
    y = layer(x)
    # The op draws its seed so; drawing it again gives the same mask to the reference.
    torch.manual_seed(1234)
    seed = torch.randint(2**63 - 1, (), dtype=torch.int64) if (p > 0 and training) else 0
    grad_y = rand_x(y.shape, dtype, seed=2)
    wrt = ["x", "lora_A", "lora_B"] + (["scaling", "bias"] if learnable else [])
    params = {
        "x": x,
        "lora_A": layer.lora_A,
        "lora_B": layer.lora_B,
        "scaling": layer.scaling,
        "bias": layer.original_linear.bias,
    }
    grads = torch.autograd.grad(y, [params[k] for k in wrt], grad_y)
    y64, grads64 = reference_and_grads(layer, x, p, training, seed, grad_y, wrt)

    assert y.dtype == dtype and y.shape == (*x_shape[:-1], N)
    assert_close(y, y64, dtype, "output")
    for name, grad in zip(wrt, grads, strict=True):
        assert grad.dtype == params[name].dtype, f"grad of {name} in {grad.dtype}"
        assert_close(grad, grads64[name], dtype, f"grad of {name}")


def test_eval_mode_applies_no_dropout_and_draws_no_seed():
    layer = make_layer(24, 10, 4, dropout=0.5).eval()
    x = rand_x((9, 24), torch.float32)
    state = torch.get_rng_state()
    y = layer(x)
    assert torch.equal(torch.get_rng_state(), state), "eval mode drew from the generator"
    layer.dropout = 0.0
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)


def test_training_dropout_changes_output_and_manual_seed_reproduces_it():
    layer = make_layer(24, 10, 4, dropout=0.5).train()
    x = rand_x((9, 24), torch.float32)
    torch.manual_seed(5)
    y1, y2 = layer(x), layer(x)
    torch.manual_seed(5)
    assert torch.equal(layer(x), y1)
    assert not torch.equal(y1, y2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_disabled_layer_gives_exactly_the_base_output(dtype):
    layer = make_layer(20, 12, 4, dtype, dropout=0.1)
    x = rand_x((2, 5, 20), dtype).requires_grad_()
    assert not torch.equal(layer(x), layer.original_linear(x)), "the adapter must matter"
    layer.enabled = False
    y = layer(x)
    assert torch.equal(y, layer.original_linear(x))
    y.sum().backward()
    assert layer.lora_A.grad is None and layer.lora_B.grad is None
    layer.enabled = True
    assert not torch.equal(layer(x), layer.original_linear(x))


def test_wrapped_layer_is_frozen_and_adapter_trains():
    layer = make_layer(20, 12, 4)
    assert not layer.original_linear.weight.requires_grad
    assert not layer.original_linear.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_attributes_and_shapes():
    base = nn.Linear(70, 33)
    layer = LoRALinear(base, rank=7, alpha=14, dropout=0.1)
    assert layer.original_linear is base
    assert (layer.in_features, layer.out_features, layer.rank) == (70, 33, 7)
    assert layer.lora_A.shape == (7, 70) and layer.lora_B.shape == (33, 7)
    assert isinstance(layer.lora_A, nn.Parameter) and isinstance(layer.lora_B, nn.Parameter)
    assert layer.alpha == 14 and layer.dropout == 0.1
    assert layer.enabled and not layer.merged


@pytest.mark.parametrize(
    "use_rslora, expected", [(False, 16 / 4), (True, 16 / 2)], ids=["alpha_over_r", "rslora"]
)
def test_scaling_is_alpha_over_rank_or_over_sqrt_rank(use_rslora, expected):
    layer = LoRALinear(nn.Linear(8, 8), rank=4, alpha=16, use_rslora=use_rslora)
    assert isinstance(layer.scaling, float) and layer.scaling == expected


@pytest.mark.parametrize(
    "dtype, adapter_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
    ids=["fp32", "fp64", "bf16", "fp16"],
)
def test_adapter_dtype_is_float32_on_half_layers_else_the_layer_dtype(dtype, adapter_dtype):
    layer = LoRALinear(nn.Linear(8, 6, dtype=dtype), rank=2, learnable_scaling=True)
    assert layer.lora_A.dtype == layer.lora_B.dtype == adapter_dtype
    assert isinstance(layer.scaling, nn.Parameter)
    assert layer.scaling.dtype == adapter_dtype and layer.scaling.shape == ()
    assert layer.scaling.requires_grad and layer.scaling.item() == 8.0
    assert layer.original_linear.weight.dtype == dtype


def test_adapter_lives_on_the_wrapped_layer_device():
    # The meta device stands in for an accelerator on a CPU-only machine.
    layer = LoRALinear(nn.Linear(8, 6, device="meta"), rank=2, learnable_scaling=True)
    assert layer.lora_A.device.type == layer.lora_B.device.type == "meta"
    assert layer.scaling.device.type == "meta"


def test_half_layer_with_float32_adapter_gives_half_output_and_float32_grads():
    layer = make_layer(32, 16, 4, torch.bfloat16)
    x = rand_x((5, 32), torch.bfloat16).requires_grad_()
    y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32


def test_autocast_behaves_like_nn_linear():
    layer = make_layer(32, 16, 4)
    x = rand_x((5, 32), torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_linear = layer.original_linear(x)
    assert y.dtype == y_linear.dtype == torch.bfloat16
    with torch.no_grad():
        y64 = lora_linear_reference(
            x.double(),
            layer.original_linear.weight.double(),
            layer.original_linear.bias.double(),
            layer.lora_A.double(),
            layer.lora_B.double(),
            layer.scaling,
        )
    assert_close(y, y64, torch.bfloat16, "autocast output")


def test_kaiming_init_is_uniform_within_one_over_sqrt_k_with_zero_b():
    torch.manual_seed(0)
    K = 256
    layer = LoRALinear(nn.Linear(K, 16), rank=8, init="kaiming")
    A = layer.lora_A.detach()
    bound = 1 / math.sqrt(K)
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    # Uniform(-b, b) has std b / sqrt(3); 2048 samples estimate it within a few %.
    assert abs(A.std().item() / (bound / math.sqrt(3)) - 1) < 0.1
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_gaussian_init_has_std_one_over_rank_with_zero_b():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 16), rank=4, init="gaussian")
    assert abs(layer.lora_A.std().item() * 4 - 1) < 0.1
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_zero_b_init_leaves_output_unchanged(init):
    torch.manual_seed(0)
    base = nn.Linear(30, 20)
    x = rand_x((7, 30), torch.float32)
    expected = base(x)
    layer = LoRALinear(base, rank=4, alpha=8, init=init)
    assert layer.lora_A.abs().max() > 0
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize(
    "dtype, rslora", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)]
)
def test_svd_init_leaves_output_unchanged_and_holds_top_singular_triplets(dtype, rslora):
    torch.manual_seed(0)
    K, N, R = 40, 24, 5
    base = nn.Linear(K, N).to(dtype)
    W = base.weight.detach().double().clone()
    x = rand_x((2, 9, K), dtype)
    expected = base(x).detach()
    layer = LoRALinear(base, rank=R, alpha=3.0, init="svd", use_rslora=rslora).eval()
    s = layer.scaling

    assert_close(layer(x), expected, dtype, "output after svd init")
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    top = (U[:, :R] * S[:R]) @ Vh[:R]
    BA = s * layer.lora_B.double() @ layer.lora_A.double()
    assert_close(BA, top, dtype, "s B A vs the top-R SVD part of W")
    residual = layer.original_linear.weight.double()
    assert_close(residual + BA, W, dtype, "residual + s B A vs W")
    # The residual keeps the other singular values: its largest is the (R+1)-th of W.
    assert_close(torch.linalg.svdvals(residual)[:1], S[R : R + 1], dtype, "sigma_1(res)")
    # A and B are balanced factors: both carry sqrt(S_r) / sqrt(s).
    torch.testing.assert_close(
        layer.lora_A.double().norm(dim=1), (S[:R] / s).sqrt(), rtol=1e-4, atol=0
    )


def test_svd_init_trains_both_factors_from_step_one():
    layer = LoRALinear(nn.Linear(20, 12), rank=3, init="svd")
    layer(rand_x((4, 20), torch.float32)).square().sum().backward()
    assert layer.lora_A.grad.abs().max() > 0 and layer.lora_B.grad.abs().max() > 0


def test_reset_after_svd_init_restores_the_original_weight():
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    W = base.weight.detach().clone()
    layer = LoRALinear(base, rank=3, init="svd")
    assert not torch.allclose(layer.original_linear.weight, W)
    layer.init = "kaiming"
    layer.reset_lora_parameters()
    torch.testing.assert_close(layer.original_linear.weight, W, rtol=0, atol=1e-6)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))


def test_unwrap_gives_back_the_original_layer_after_svd_init_and_merge():
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    W = base.weight.detach().clone()
    layer = LoRALinear(base, rank=3, init="svd")
    with torch.no_grad():
        layer.lora_B.add_(0.1)  # training moved the adapter
    layer.merge()
    restored = layer.unwrap()
    assert restored is base
    torch.testing.assert_close(restored.weight, W, rtol=0, atol=1e-6)


def test_svd_init_rejects_rank_above_min_dimension():
    base = nn.Linear(10, 6)
    with pytest.raises(ValueError, match=r"rank <= min\(in_features, out_features\) = 6.*7"):
        LoRALinear(base, rank=7, init="svd")
    assert base.weight.requires_grad


def merge_tolerance(dtype):
    return REL_TOL[dtype]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_merge_weights_returns_a_new_linear_matching_eval_output(dtype, bias):
    layer = make_layer(30, 20, 4, dtype, bias=bias, dropout=0.1).eval()
    W = layer.original_linear.weight.detach().clone()
    x = rand_x((3, 7, 30), dtype)
    merged = layer.merge_weights()
    assert type(merged) is nn.Linear and merged is not layer.original_linear
    assert merged.weight.dtype == dtype
    assert merged.weight.data_ptr() != layer.original_linear.weight.data_ptr()
    assert torch.equal(layer.original_linear.weight, W), "merge_weights changed the layer"
    if bias:
        assert torch.equal(merged.bias, layer.original_linear.bias)
        assert merged.bias.data_ptr() != layer.original_linear.bias.data_ptr()
    else:
        assert merged.bias is None
    with torch.no_grad():
        assert_close(merged(x), layer(x), dtype, "merged layer vs LoRA layer")
    # The adapter matters: without the delta the outputs would differ far more.
    assert rel_error(layer.original_linear(x), layer(x)) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_merge_then_unmerge_in_place_round_trips_within_one_rounding_step(dtype):
    layer = make_layer(30, 20, 4, dtype).eval()
    weight = layer.original_linear.weight
    W = weight.detach().clone()
    x = rand_x((7, 30), dtype)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        assert layer.merged and not torch.equal(weight, W)
        assert_close(layer(x), y, dtype, "merged output")
        # While merged the branch is skipped: changing B changes nothing.
        B = layer.lora_B.clone()
        layer.lora_B.mul_(3)
        assert torch.equal(layer(x), layer.original_linear(x))
        layer.lora_B.copy_(B)
        delta = (layer.scaling * layer.lora_B.double() @ layer.lora_A.double()).abs()
        layer.unmerge()
    assert not layer.merged
    # Each of merge and unmerge rounds once: the error is at most half an ulp of the
    # merged value plus half an ulp of the restored one.
    eps = torch.finfo(dtype).eps
    bound = 0.5 * eps * ((W.double().abs() + delta) + W.double().abs())
    error = (weight.double() - W.double()).abs()
    assert (error <= bound * 1.001 + torch.finfo(dtype).tiny).all(), float(error.max())


def test_merge_twice_warns_and_does_not_add_twice():
    layer = make_layer(16, 8, 2)
    layer.merge()
    W = layer.original_linear.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.original_linear.weight, W)


def test_unmerge_of_an_unmerged_layer_warns_and_does_nothing():
    layer = make_layer(16, 8, 2)
    W = layer.original_linear.weight.detach().clone()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    assert torch.equal(layer.original_linear.weight, W) and not layer.merged


@pytest.mark.parametrize("method", ["merge", "merge_weights"])
def test_merging_a_non_finite_delta_refuses_and_leaves_the_weight(method):
    layer = make_layer(16, 8, 2)
    W = layer.original_linear.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*left unchanged"):
        getattr(layer, method)()
    assert torch.equal(layer.original_linear.weight, W) and not layer.merged


def test_merge_that_overflows_fp16_refuses_and_leaves_the_weight():
    layer = make_layer(16, 8, 2, torch.float16)
    with torch.no_grad():
        layer.original_linear.weight.fill_(60000.0)
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(10000.0)  # 60000 + 2 * 2 * 10000 > 65504
    W = layer.original_linear.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert torch.equal(layer.original_linear.weight, W) and not layer.merged


def test_disabling_a_merged_layer_unmerges_it_and_gives_the_base_output():
    layer = make_layer(16, 8, 2)
    W = layer.original_linear.weight.detach().clone()
    x = rand_x((3, 16), torch.float32)
    layer.merge()
    layer.enabled = False
    assert not layer.merged
    torch.testing.assert_close(layer.original_linear.weight, W, rtol=0, atol=1e-6)
    assert torch.equal(layer(x), layer.original_linear(x))


def test_merge_of_a_disabled_layer_and_reset_of_a_merged_layer_raise():
    layer = make_layer(16, 8, 2)
    layer.enabled = False
    with pytest.raises(RuntimeError, match="disabled"):
        layer.merge()
    layer.enabled = True
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.reset_lora_parameters()


BAD_ARGUMENTS = [
    pytest.param({"rank": 0}, ValueError, r"rank must be an int >= 1, got 0", id="rank0"),
    pytest.param({"rank": -3}, ValueError, r"rank.*got -3", id="rank-neg"),
    pytest.param({"rank": 2.0}, TypeError, r"rank must be an int.*2\.0", id="rank-float"),
    pytest.param({"rank": True}, TypeError, r"rank must be an int.*True", id="rank-bool"),
    pytest.param({"alpha": 0}, ValueError, r"alpha must be a finite number > 0, got 0",
                 id="alpha0"),
    pytest.param({"alpha": -1.0}, ValueError, r"alpha.*-1\.0", id="alpha-neg"),
    pytest.param({"alpha": float("inf")}, ValueError, r"alpha.*inf", id="alpha-inf"),
    pytest.param({"alpha": float("nan")}, ValueError, r"alpha.*nan", id="alpha-nan"),
    pytest.param({"alpha": "16"}, TypeError, r"alpha.*'16'", id="alpha-str"),
    pytest.param({"dropout": 1.0}, ValueError, r"dropout must be a float in \[0, 1\), got 1\.0",
                 id="dropout1"),
    pytest.param({"dropout": -0.1}, ValueError, r"dropout.*-0\.1", id="dropout-neg"),
    pytest.param({"dropout": "0.1"}, TypeError, r"dropout.*'0\.1'", id="dropout-str"),
    pytest.param({"init": "xavier"}, ValueError, r"init must be one of.*'xavier'", id="init"),
    pytest.param({"backend": "nope"}, ValueError, r"backend must be one of.*'nope'", id="backend"),
    pytest.param({"use_rslora": 1}, TypeError, r"use_rslora must be a bool, got 1", id="rslora"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, error, message", BAD_ARGUMENTS)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, message):
    base = nn.Linear(8, 8)
    with pytest.raises(error, match=message):
        LoRALinear(base, **kwargs)
    assert base.weight.requires_grad, "a refused call must leave the layer as it was"


@pytest.mark.parametrize(
    "module",
    [nn.Conv1d(4, 4, 1), nn.Bilinear(4, 4, 4), LoRALinear(nn.Linear(4, 4))],
    ids=["Conv1d", "Bilinear", "LoRALinear"],
)
def test_wrapping_a_module_that_is_not_nn_linear_raises(module):
    with pytest.raises(TypeError, match=f"must be a torch.nn.Linear, got {type(module).__name__}"):
        LoRALinear(module)


def test_input_with_wrong_last_dimension_names_both_numbers():
    layer = make_layer(70, 33, 7)
    with pytest.raises(ValueError, match=r"in_features = 70.*got 69"):
        layer(torch.randn(4, 69))


def test_input_on_another_device_than_the_layer_raises():
    layer = make_layer(8, 4, 2)
    with pytest.raises(ValueError, match="one device.*x on meta.*weight on cpu"):
        layer(torch.randn(3, 8, device="meta"))


def test_extra_repr_shows_features_rank_alpha_dropout_backend():
    layer = LoRALinear(nn.Linear(70, 33), rank=7, alpha=14, dropout=0.1, backend="torch")
    assert layer.extra_repr() == (
        "in_features=70, out_features=33, rank=7, alpha=14, dropout=0.1, backend='torch'"
    )
    layer.merge()
    assert "merged=True" in repr(layer)


def test_layer_state_dict_round_trip_reproduces_the_output():
    layer = make_layer(20, 12, 4, learnable_scaling=True)
    with torch.no_grad():
        layer.scaling.fill_(0.3)
    state = layer.state_dict()
    assert set(state) == {
        "lora_A",
        "lora_B",
        "scaling",
        "original_linear.weight",
        "original_linear.bias",
    }
    fresh = LoRALinear(nn.Linear(20, 12), rank=4, learnable_scaling=True)
    fresh.load_state_dict(state)
    x = rand_x((5, 20), torch.float32)
    assert torch.equal(fresh(x), layer(x))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_give_an_independent_equal_layer(how):
    torch.manual_seed(0)
    base = nn.Linear(20, 12)
    W = base.weight.detach().clone()
    layer = LoRALinear(base, rank=4, init="svd", learnable_scaling=True, dropout=0.1).eval()
    with torch.no_grad():
        layer.lora_B.add_(torch.randn(12, 4))
    clone = copy.deepcopy(layer) if how == "deepcopy" else pickle.loads(pickle.dumps(layer))
    x = rand_x((5, 20), torch.float32)
    assert torch.equal(clone(x), layer(x))
    assert clone.lora_A.data_ptr() != layer.lora_A.data_ptr()
    assert isinstance(clone.scaling, nn.Parameter) and clone.scaling.requires_grad
    with torch.no_grad():
        clone.lora_B.zero_()
    assert not torch.equal(clone(x), layer(x))
    # The SVD bookkeeping travels too: unwrapping the clone gives the original weight.
    torch.testing.assert_close(clone.unwrap().weight, W, rtol=0, atol=1e-6)
