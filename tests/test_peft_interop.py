"""A patched peft model stays the same model in every way patch_peft does not mean to
change: pickling, forwards and hooks installed by others (X-LoRA, accelerate, module
hooks), copies and data-parallel replicas, meta tensors; and the report and its call
counts. Each case compares the patched model with an unpatched copy."""

from __future__ import annotations

import collections
import copy
import functools
import io
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import FP32_TOL, LoraLinearCalls, rel_error
from torch import nn

import lora_kernels.peft_patch as peft_patch
from lora_kernels import LoRALinear, apply_lora, lora_layers, lora_linear, patch_peft, unpatch_peft

peft = pytest.importorskip("peft", reason="peft is not installed (an optional dependency)")
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as peft_lora_layer  # noqa: E402

PeftLinear = peft_lora_layer.Linear


class Net(nn.Module):
    """Two LoRA targets of odd sizes with a nonlinearity between them, and a head."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(13, 11)
        self.v = nn.Linear(11, 7, bias=False)
        self.head = nn.Linear(7, 5)

    def forward(self, h):
        return self.head(self.v(torch.tanh(self.q(h))))


def peft_net(seed=0, dropout=0.0, targets=("q", "v")):
    """A peft model of Net, its adapters random (never zero)."""
    torch.manual_seed(seed)
    model = get_peft_model(
        Net(), LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout, target_modules=list(targets))
    )
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return model


def inputs(seed=1, shape=(4, 3, 13)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def lora_layer(model, name="q"):
    return model.base_model.model.get_submodule(name)


def forward_backward(model, x, *args, **kwargs):
    """Output, and the grads of x and of every trainable parameter, for a fixed loss."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    out = model(x, *args, **kwargs)
    (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    # "_orig_mod." is torch.compile's wrapper.
    grads = {
        n.removeprefix("_orig_mod."): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    grads["x"] = x.grad.clone()
    return out.detach(), grads


def assert_same_results(got, expected, tol=FP32_TOL):
    (out, grads), (out_ref, grads_ref) = got, expected
    assert rel_error(out, out_ref) <= tol
    assert sorted(grads) == sorted(grads_ref)
    for name in grads:
        assert rel_error(grads[name], grads_ref[name]) <= tol, name


def instance_state(model):
    """Each module's class and instance attributes (values by identity)."""
    return {
        name: (type(m), {k: id(v) for k, v in m.__dict__.items()})
        for name, m in model.named_modules()
    }


# ----------------------------------------------------------------------------------------
# The class swap, and unpatch_peft
# ----------------------------------------------------------------------------------------


def test_patched_module_is_a_peft_linear_subclass_and_unpatch_restores_every_attribute(
    monkeypatch,
):
    model = peft_net()
    reference = copy.deepcopy(model)
    before = instance_state(model)
    report = patch_peft(model)
    assert report.patched == ["base_model.model.q", "base_model.model.v"]
    for name in ("q", "v"):
        layer = lora_layer(model, name)
        assert type(layer) is peft_patch.PatchedLoraLinear
        assert isinstance(layer, PeftLinear)
        # The forward is the class's: nothing callable in the instance dict.
        assert "forward" not in layer.__dict__
    counter = LoraLinearCalls(monkeypatch)
    x = inputs()
    assert_same_results(forward_backward(model, x), forward_backward(reference, x))
    assert counter.calls == 2
    assert unpatch_peft(model) == ["base_model.model.q", "base_model.model.v"]
    assert instance_state(model) == before
    assert unpatch_peft(model) == []
    model(x)
    assert counter.calls == 2


def test_patch_peft_twice_repatches_with_the_new_backend_and_report():
    model = peft_net()
    first = patch_peft(model)
    second = patch_peft(model, backend="torch")
    assert second.patched == first.patched
    assert lora_layer(model).__dict__[peft_patch._BACKEND_ATTR] == "torch"
    model(inputs())
    assert (first.calls.fused, second.calls.fused) == (0, 2)
    unpatch_peft(model)
    assert type(lora_layer(model)) is PeftLinear


def test_patch_peft_again_after_a_forward_was_set_on_a_patched_module():
    """The second patch_peft finds the forward another library set since the first,
    gives that module peft's class back and reports it; the forward stays."""
    model = peft_net()
    patch_peft(model)
    layer = lora_layer(model, "v")
    inner = layer.forward

    def wrapper(x):
        return inner(x) + 1.0

    layer.forward = wrapper
    report = patch_peft(model)
    assert report.patched == ["base_model.model.q"]
    assert "wrapper" in report.not_patched["base_model.model.v"]
    assert type(layer) is PeftLinear and layer.forward is wrapper
    assert peft_patch._BACKEND_ATTR not in layer.__dict__


def test_bound_forward_taken_while_patched_runs_peft_after_unpatch(monkeypatch):
    model = peft_net()
    reference = copy.deepcopy(model)
    patch_peft(model)
    captured = lora_layer(model).forward  # as accelerate's add_hook_to_module keeps it
    unpatch_peft(model)
    counter = LoraLinearCalls(monkeypatch)
    x = inputs(shape=(5, 13))
    with torch.no_grad():
        assert torch.equal(captured(x), lora_layer(reference)(x))
    assert counter.calls == 0


# ----------------------------------------------------------------------------------------
# 1. pickle and torch.save
# ----------------------------------------------------------------------------------------


def test_issue_reproducer_pickle_of_patched_sequential():
    model = get_peft_model(nn.Sequential(nn.Linear(10, 10)), LoraConfig(target_modules=["0"]))
    patch_peft(model)
    loaded = pickle.loads(pickle.dumps(model))
    assert type(loaded.base_model.model[0]) is peft_patch.PatchedLoraLinear


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickled_patched_model_loads_patched_with_the_same_results(monkeypatch, how):
    model = peft_net(dropout=0.2).eval()
    reference = copy.deepcopy(model)
    report = patch_peft(model)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    for name in ("q", "v"):
        layer = lora_layer(loaded, name)
        assert type(layer) is peft_patch.PatchedLoraLinear
        assert layer.base_layer is not lora_layer(model, name).base_layer
    counter = LoraLinearCalls(monkeypatch)
    x = inputs()
    assert_same_results(forward_backward(loaded, x), forward_backward(reference, x))
    assert counter.calls == 2
    # The loaded copy counts its calls apart from the original's report.
    assert report.calls.fused == 0
    assert unpatch_peft(loaded) == ["base_model.model.q", "base_model.model.v"]


def test_pickled_patched_model_loads_in_a_fresh_process(tmp_path):
    """Unpickling finds PatchedLoraLinear by its qualified name with nothing imported
    beforehand (the class is made on that first lookup)."""
    # Classes from torch and peft only: the other process cannot import this file.
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(13, 11), nn.Tanh(), nn.Linear(11, 7))
    config = LoraConfig(r=3, target_modules=["0", "2"], init_lora_weights=False)
    model = get_peft_model(base, config)
    assert patch_peft(model).patched == ["base_model.model.0", "base_model.model.2"]
    x = inputs()
    with torch.no_grad():
        expected = model(x)
    torch.save({"model": model, "x": x, "expected": expected}, tmp_path / "model.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        assert "lora_kernels" not in sys.modules and "peft" not in sys.modules
        saved = torch.load({str(tmp_path / "model.pt")!r}, weights_only=False)
        layer = saved["model"].base_model.model[0]
        assert type(layer).__qualname__ == "PatchedLoraLinear", type(layer)
        with torch.no_grad():
            out = saved["model"](saved["x"])
        assert torch.equal(out, saved["expected"]), (out - saved["expected"]).abs().max()
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_unpatched_model_pickles_without_lora_kernels():
    model = peft_net()
    patch_peft(model)
    assert b"lora_kernels" in pickle.dumps(model)
    unpatch_peft(model)
    assert b"lora_kernels" not in pickle.dumps(model)


def test_torch_save_of_a_model_holding_lora_linear_layers():
    torch.manual_seed(0)
    model = apply_lora(Net(), rank=3, alpha=6, target_modules=["q", "v"])
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded.q, LoRALinear) and loaded.q.lora_A is not model.q.lora_A
    x = inputs()
    assert_same_results(forward_backward(loaded, x), forward_backward(model, x), tol=0.0)


# ----------------------------------------------------------------------------------------
# 2. Forwards and hooks that others installed
# ----------------------------------------------------------------------------------------


def test_forward_set_on_the_instance_is_left_to_its_owner(monkeypatch):
    """A wrapper installed as `module.forward` (what X-LoRA and accelerate do) is never
    replaced: the module is reported and keeps running the wrapper."""
    model = peft_net()
    reference = copy.deepcopy(model)
    seen = []

    def wrap(layer):
        inner = layer.forward

        def logging_forward(x, *args, **kwargs):
            seen.append(tuple(x.shape))
            return inner(x, *args, **kwargs) * 2.0

        layer.forward = logging_forward

    for m in (model, reference):
        wrap(lora_layer(m, "q"))
    wrapper = lora_layer(model, "q").forward
    before = instance_state(model)
    report = patch_peft(model)
    assert report.patched == ["base_model.model.v"]
    why = report.not_patched["base_model.model.q"]
    assert "replaced on the instance by" in why and "logging_forward" in why, why
    assert lora_layer(model, "q").forward is wrapper
    counter = LoraLinearCalls(monkeypatch)
    x = inputs()
    assert_same_results(forward_backward(model, x), forward_backward(reference, x))
    assert counter.calls == 1  # v only
    assert len(seen) == 2  # the wrapper ran for both models
    unpatch_peft(model)
    assert instance_state(model) == before


def test_xlora_model_is_left_to_xlora(tmp_path):
    """X-LoRA sets its own forward on every lora.Linear (the reproducer: after patch_peft
    the next forward raised TypeError about `scalings`, and unpatch_peft lost X-LoRA's
    forward). Now every layer is reported, and the model is X-LoRA's, bit for bit."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    import tiny_models
    from peft import XLoraConfig

    adapters = {}
    for i in range(2):
        expert = get_peft_model(
            tiny_models.tiny_llama(seed=i),
            LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        expert.save_pretrained(tmp_path / f"expert{i}")
        adapters[str(i)] = str(tmp_path / f"expert{i}")
    base = tiny_models.tiny_llama(seed=3)
    base.config.use_cache = False
    torch.manual_seed(4)
    model = get_peft_model(
        base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=32, xlora_depth=2, adapters=adapters)
    ).eval()
    reference = copy.deepcopy(model)
    before = instance_state(model)
    report = patch_peft(model)
    assert instance_state(model) == before  # nothing was touched
    assert report.patched == []
    assert len(report.not_patched) == 4  # q_proj and v_proj of two layers
    for why in report.not_patched.values():
        assert "XLoraLinearLayer.forward" in why, why
    assert "4 x its forward was replaced on the instance" in str(report)
    ids = torch.randint(0, tiny_models.VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    results = []
    for m in (model, reference):
        logits = m(input_ids=ids).logits
        logits.square().mean().backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (out, grads), (out_ref, grads_ref) = results
    assert torch.equal(out, out_ref)
    assert sorted(grads) == sorted(grads_ref) and grads  # X-LoRA's classifier
    for name in grads:
        assert torch.equal(grads[name], grads_ref[name]), name
    assert unpatch_peft(model) == []


def test_accelerate_hook_on_the_layer_keeps_running(monkeypatch):
    """A hook added with accelerate's add_hook_to_module before patching (it replaces
    forward on the instance) used to stop running silently."""
    hooks = pytest.importorskip("accelerate.hooks", reason="accelerate is not installed")

    class Scale(hooks.ModelHook):
        def __init__(self):
            self.calls = 0

        def post_forward(self, module, output):
            self.calls += 1
            return output * 3.0

    model = peft_net()
    reference = copy.deepcopy(model)
    hook, hook_ref = Scale(), Scale()
    hooks.add_hook_to_module(lora_layer(model, "v"), hook)
    hooks.add_hook_to_module(lora_layer(reference, "v"), hook_ref)
    before = instance_state(model)
    report = patch_peft(model)
    assert report.patched == ["base_model.model.q"]
    assert "accelerate's add_hook_to_module (Scale)" in report.not_patched["base_model.model.v"]
    x = inputs()
    assert_same_results(forward_backward(model, x), forward_backward(reference, x))
    assert hook.calls == hook_ref.calls == 1
    unpatch_peft(model)
    assert instance_state(model) == before
    # remove_hook_from_module leaves the layer's own bound peft forward on the
    # instance: the same computation as the class's, so now v is served.
    hooks.remove_hook_from_module(lora_layer(model, "v"))
    hooks.remove_hook_from_module(lora_layer(reference, "v"))
    assert patch_peft(model).patched == ["base_model.model.q", "base_model.model.v"]
    counter = LoraLinearCalls(monkeypatch)
    assert_same_results(forward_backward(model, x), forward_backward(reference, x))
    assert counter.calls == 2


def test_the_modules_own_bound_peft_forward_on_the_instance_is_served(monkeypatch):
    """What accelerate's remove_hook_from_module leaves: `module.forward` set to the
    module's own bound peft forward. That is the class's computation, so the module is
    served, and unpatch_peft puts the very same object back."""
    model = peft_net()
    reference = copy.deepcopy(model)
    layer = lora_layer(model, "q")
    own = layer.forward
    layer.forward = own
    before = instance_state(model)
    report = patch_peft(model)
    assert report.patched == ["base_model.model.q", "base_model.model.v"]
    counter = LoraLinearCalls(monkeypatch)
    x = inputs()
    assert_same_results(forward_backward(model, x), forward_backward(reference, x))
    assert counter.calls == 2
    unpatch_peft(model)
    assert instance_state(model) == before
    assert layer.__dict__["forward"] is own


def test_hooks_on_the_patched_module_itself_keep_running(monkeypatch):
    """Forward pre-hooks, forward hooks and backward hooks registered on a lora.Linear
    by others run around the fused forward, as around peft's; the layer is served."""
    model = peft_net()
    reference = copy.deepcopy(model)
    events = collections.Counter()

    def add_hooks(layer, tag):
        def pre(module, args):
            events[tag, "pre"] += 1
            return (args[0] * 0.5,)

        def post(module, args, output):
            events[tag, "post"] += 1
            return output + 1.0

        def backward(module, grad_input, grad_output):
            events[tag, "backward"] += 1

        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(post)
        layer.register_full_backward_hook(backward)

    add_hooks(lora_layer(model), "patched")
    add_hooks(lora_layer(reference), "peft")
    report = patch_peft(model)
    assert report.not_patched == {}
    counter = LoraLinearCalls(monkeypatch)
    x = inputs()
    assert_same_results(forward_backward(model, x), forward_backward(reference, x))
    assert counter.calls == 2
    for kind in ("pre", "post", "backward"):
        assert events["patched", kind] == events["peft", kind] == 1, kind


def test_hooks_on_submodules_and_global_hooks_fall_back_and_are_counted():
    """A hook on base_layer/lora_A/... or a global module hook would not see peft's
    submodule calls under the fused op: such calls go to peft, counted by reason."""
    model = peft_net()
    reference = copy.deepcopy(model)
    report = patch_peft(model)
    names = {id(m): n for net in (model, reference) for n, m in net.named_modules()}
    seen = []

    def record(module, args, output):
        seen.append(names.get(id(module)))

    x = inputs()
    handle = lora_layer(model).lora_A["default"].register_forward_hook(record)
    handle_ref = lora_layer(reference).lora_A["default"].register_forward_hook(record)
    assert_same_results(forward_backward(model, x), forward_backward(reference, x))
    assert seen == ["base_model.model.q.lora_A.default"] * 2
    handle.remove()
    handle_ref.remove()
    assert report.calls.by_peft == {"hooks on base_layer, lora_A, lora_B or lora_dropout": 1}
    assert report.calls.fused == 1

    report.calls.reset()
    seen.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        out = forward_backward(model, x)
        patched_seen = list(seen)
        seen.clear()
        out_ref = forward_backward(reference, x)
    finally:
        handle.remove()
    assert_same_results(out, out_ref)
    assert patched_seen == seen
    assert report.calls.fused == 0
    assert sum(report.calls.by_peft.values()) == 2
    assert "global module hooks" in next(iter(report.calls.by_peft))


def test_peft_forward_replaced_on_the_class_is_left_to_it(monkeypatch):
    """A library that wraps peft's lora.Linear.forward for every instance: patch_peft
    does not override it."""
    original = PeftLinear.forward
    calls = []

    @functools.wraps(original)
    def wrapped(self, x, *args, **kwargs):
        calls.append(1)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(PeftLinear, "forward", wrapped)
    model = peft_net()
    report = patch_peft(model)
    assert report.patched == []
    assert all("replaced on the class" in why for why in report.not_patched.values())
    model(inputs())
    assert len(calls) == 2


# ----------------------------------------------------------------------------------------
# 5. Copies and data-parallel replicas run their own weights
# ----------------------------------------------------------------------------------------


def replicate_on_cpu(network, transform):
    """torch.nn.parallel.replicate's steps for one replica, with `transform(param)` in
    place of the broadcast copy (replicate itself needs CUDA devices)."""
    modules = list(network.modules())
    replicas = {m: m._replicate_for_data_parallel() for m in modules}
    for module in modules:
        replica = replicas[module]
        for key, child in module._modules.items():
            setattr(replica, key, None if child is None else replicas[child])
        for key, param in module._parameters.items():
            # Replicas' parameters are not leaves: replicate sets them as attributes.
            setattr(replica, key, None if param is None else transform(param))
    return replicas[network]


def test_data_parallel_replica_runs_its_own_weights(monkeypatch):
    model = peft_net()
    reference = copy.deepcopy(model)
    patch_peft(model)
    layer = lora_layer(model)
    assert layer._replicate_for_data_parallel().forward.__self__ is not layer

    def transform(p):
        return p * 1.5 + 0.01

    counter = LoraLinearCalls(monkeypatch)
    replica = replicate_on_cpu(model, transform)
    replica_ref = replicate_on_cpu(reference, transform)
    x = inputs()
    out, grads = forward_backward(replica, x)
    out_ref, grads_ref = forward_backward(replica_ref, x)
    assert counter.calls == 2
    assert rel_error(out, out_ref) <= FP32_TOL
    # The gradients reach the original parameters through the replica's copies.
    model_grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert sorted(model_grads) == sorted(ref_grads) and len(model_grads) == 4
    for name in model_grads:
        assert rel_error(model_grads[name], ref_grads[name]) <= FP32_TOL, name
    # And the replica's weights are not the original's.
    with torch.no_grad():
        assert rel_error(replica(x), model(x)) > 1e-2


def test_copy_copy_runs_on_its_own_instance_state(monkeypatch):
    model = peft_net()
    reference = copy.deepcopy(model)
    patch_peft(model)
    layer, layer_ref = lora_layer(model), lora_layer(reference)
    clone, clone_ref = copy.copy(layer), copy.copy(layer_ref)
    assert clone.forward.__self__ is clone
    x = inputs(shape=(6, 13))
    counter = LoraLinearCalls(monkeypatch)
    with torch.no_grad():
        # Adapters disabled on the shallow copy only.
        clone._disable_adapters = clone_ref._disable_adapters = True
        assert torch.equal(clone(x), clone_ref(x))
        assert torch.equal(clone(x), layer.base_layer(x))
        assert rel_error(layer(x), layer_ref(x)) <= FP32_TOL
        assert rel_error(layer(x), clone(x)) > 1e-2
    assert counter.calls == 2  # the two calls of the original


def test_deepcopy_runs_its_own_weights(monkeypatch):
    model = peft_net()
    patch_peft(model)
    clone = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    unpatch_peft(reference)
    with torch.no_grad():
        for m in (clone, reference):
            lora_layer(m).lora_B["default"].weight.mul_(-2.0)
    counter = LoraLinearCalls(monkeypatch)
    x = inputs()
    assert_same_results(forward_backward(clone, x), forward_backward(reference, x))
    assert counter.calls == 2
    with torch.no_grad():
        assert rel_error(clone(x), model(x)) > 1e-2


# ----------------------------------------------------------------------------------------
# 6. Meta tensors: shape inference
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.25], ids=["p0", "p0.25"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen-W", "trainable-W"])
def test_lora_linear_on_meta_gives_shapes_and_grad_shapes(p, weight_grad):
    def meta(*shape, grad=True):
        return torch.empty(shape, device="meta", requires_grad=grad)

    x = meta(2, 3, 9)
    weight, bias = meta(5, 9, grad=weight_grad), meta(5)
    A, B = meta(4, 9), meta(5, 4)
    state = torch.random.get_rng_state()
    y = lora_linear(x, weight, bias, A, B, 0.5, dropout_p=p)
    assert (y.device.type, y.shape, y.dtype) == ("meta", (2, 3, 5), torch.float32)
    y.sum().backward()
    for t in (x, bias, A, B) + ((weight,) if weight_grad else ()):
        assert t.grad.device.type == "meta" and t.grad.shape == t.shape
    # No dropout seed is drawn for a run that computes nothing.
    assert torch.equal(torch.random.get_rng_state(), state)


def test_lora_linear_on_meta_under_cpu_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(
            torch.empty(3, 8, device="meta"),
            torch.empty(6, 8, device="meta"),
            None,
            torch.empty(2, 8, device="meta"),
            torch.empty(6, 2, device="meta"),
            1.0,
        )
    assert (y.device.type, y.shape) == ("meta", (3, 6))


def test_meta_apply_lora_then_to_empty_and_loaded_weights_match_a_real_model():
    torch.manual_seed(0)
    real = apply_lora(Net(), rank=3, alpha=6, dropout=0.1, target_modules=["q", "v"])
    with torch.no_grad():
        for _, layer in lora_layers(real):
            layer.lora_B.normal_()
    with torch.device("meta"):
        deferred = apply_lora(Net(), rank=3, alpha=6, dropout=0.1, target_modules=["q", "v"])
    assert isinstance(deferred.q, LoRALinear)
    y = deferred(torch.empty(4, 13, device="meta"))
    assert (y.device.type, y.shape) == ("meta", (4, 5))
    deferred.to_empty(device="cpu")
    deferred.load_state_dict(real.state_dict())
    x = inputs()
    assert_same_results(forward_backward(deferred, x), forward_backward(real, x), tol=0.0)


def test_patched_peft_on_meta_runs_the_fused_op_for_shapes(monkeypatch):
    """The reproducer: a patched model's forward on meta tensors raised in the autocast
    check. Then to_empty and real weights give the unpatched model's results."""
    real = peft_net()
    with torch.device("meta"):
        deferred = get_peft_model(Net(), LoraConfig(r=3, lora_alpha=6, target_modules=["q", "v"]))
    assert lora_layer(deferred).base_layer.weight.device.type == "meta"
    patch_peft(deferred)
    counter = LoraLinearCalls(monkeypatch)
    y = deferred(torch.empty(4, 3, 13, device="meta"))
    assert (y.device.type, y.shape) == ("meta", (4, 3, 5))
    assert counter.calls == 2
    deferred.to_empty(device="cpu")
    deferred.load_state_dict(real.state_dict())
    x = inputs()
    assert_same_results(forward_backward(deferred, x), forward_backward(real, x))
    assert counter.calls == 4


# ----------------------------------------------------------------------------------------
# The report: grouped by reason, and call counts
# ----------------------------------------------------------------------------------------


def test_report_groups_224_not_patched_layers_by_reason():
    """One line per reason with a count and three example names, however many layers
    (224: a 32-layer model with 7 targets each, all lora_bias here but two)."""
    torch.manual_seed(0)
    base = nn.Sequential(*(nn.Linear(4, 4) for _ in range(224)))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=r"\d+", lora_bias=True))
    for i in (7, 9):
        model.base_model.model[i].fan_in_fan_out = True
    report = patch_peft(model)
    assert report.patched == []
    counts = collections.Counter(report.not_patched.values())
    assert sorted(counts.values()) == [2, 222]
    lines = str(report).splitlines()
    assert lines[1:] == [
        "  not patched, 224 module(s):",
        "    222 x adapter 'default': lora_bias=True: "
        "base_model.model.0, base_model.model.1, base_model.model.2 and 219 more",
        "    2 x fan_in_fan_out=True (transposed Conv1D weights): "
        "base_model.model.7, base_model.model.9",
    ], lines


def test_report_counts_fused_calls_and_fallbacks_by_reason():
    model = peft_net().eval()
    report = patch_peft(model)
    x = inputs()
    with torch.no_grad():
        model(x)
        with model.disable_adapter():
            model(x)
        model(x, adapter_names=["default", "__base__", "default", "default"])
        model.merge_adapter()
        model(x)
    assert report.calls.fused == 2
    assert report.calls.by_peft == {
        "adapters disabled": 2,
        "extra forward arguments (adapter_names, ...)": 2,
        "adapters merged": 2,
    }
    text = str(report)
    assert "calls since patching: 2 fused, 6 by peft" in text
    assert "    2 x adapters disabled" in text
    report.calls.reset()
    assert "calls since patching" not in str(report)


def test_patched_model_prints_as_before():
    model = peft_net()
    expected = repr(model)
    patch_peft(model)
    assert repr(model) == expected
    assert repr(model).count("lora.Linear(") >= 1


def test_compiled_patched_model_neither_recompiles_nor_counts():
    """The counters are Python state: under torch.compile they are skipped, so calls
    neither break the graph nor recompile (and are not counted)."""
    # peft's forward may be in dynamo's cache from another test, compiled around a
    # monkeypatched op: only this test's own compilations are at issue.
    torch._dynamo.reset()
    model = peft_net()
    reference = copy.deepcopy(model)
    report = patch_peft(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            x = inputs(seed=seed)
            assert_same_results(forward_backward(compiled, x), forward_backward(reference, x))
    assert report.calls.fused == 0 and not report.calls.by_peft
    model(inputs())
    assert report.calls.fused == 2
