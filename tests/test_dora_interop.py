"""DoRA across the library's edges: peft's adapter format both ways (save_adapter ->
PeftModel.from_pretrained, save_pretrained -> load_adapter), patch_peft serving peft's
DoRA layers with dora_linear, and merge/unmerge/merge_weights/merge_lora of DoRA layers
with the ||W_n||^2 cache dropped whenever the weight is written."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from helpers import DTYPE_IDS, FP32_TOL, assert_close, rel_error
from test_dora import FixedMaskDropout, plain_op_mask
from torch import nn

import lora_kernels
import lora_kernels.peft_patch as peft_patch
from lora_kernels import (
    LoRALinear,
    apply_lora,
    dora,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    patch_peft,
    save_adapter,
    unpatch_peft,
)

peft = pytest.importorskip("peft", reason="peft is not installed (an optional dependency)")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import dora as peft_dora  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16
WEIGHTS = "adapter_model.safetensors"


class Net(nn.Module):
    """Two targets of odd sizes with a nonlinearity between them, and a head."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(13, 11)
        self.v = nn.Linear(11, 7, bias=False)
        self.head = nn.Linear(7, 5)

    def forward(self, h):
        return self.head(self.v(torch.tanh(self.q(h))))


def base_net(seed=0, dtype=F32):
    torch.manual_seed(seed)
    return Net().to(dtype)


def randomize_dora(named_parameters, seed=5):
    """A and B random, m off the row norms (m/n in [0.5, 1.5)): an adapter whose
    update, and whose scale m/n, a wrong formula cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_parameters:
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
            elif "magnitude" in name:
                p.mul_(0.5 + torch.rand(p.shape, generator=g))


def peft_dora_net(seed=0, dropout=0.0, targets=("q", "v"), dtype=F32):
    model = get_peft_model(
        base_net(seed, dtype),
        LoraConfig(
            r=3, lora_alpha=6, lora_dropout=dropout, target_modules=list(targets), use_dora=True
        ),
    )
    randomize_dora(model.named_parameters(), seed + 100)
    return model


def our_dora_net(seed=0, dropout=0.0, dtype=F32):
    model = base_net(seed, dtype)
    apply_lora(model, rank=3, alpha=6, dropout=dropout, target_modules=["q", "v"], use_dora=True)
    randomize_dora(model.named_parameters(), seed + 100)
    return model


def inputs(seed=1, shape=(4, 3, 13), dtype=F32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def forward_backward(model, x):
    """Output, and the grads of x and of the trainable parameters by module path and
    part ("q.lora_A", "q.m", ...), for a fixed loss."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    out = model(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    grads = {"x": x.grad}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        name = name.removeprefix("_orig_mod.").removeprefix("base_model.model.")
        name = name.replace(".default", "")
        name = name.replace(".weight", "").replace("lora_magnitude_vector", "m")
        grads[name.replace("lora_magnitude", "m")] = p.grad
    return out.detach(), grads


def assert_same_results(got, expected, dtype=F32, exact=None):
    """`got` agrees with `expected` (peft's): directly in float32; in a 16-bit dtype each
    of them against `exact`, the same model's float64 results (two 16-bit computations
    round differently, each within the table's tolerance of the exact one)."""
    (out, grads), (out_ref, grads_ref) = got, expected
    assert out.dtype == out_ref.dtype
    assert sorted(grads) == sorted(grads_ref)
    for name in grads:
        assert grads[name].dtype == grads_ref[name].dtype, name
    if dtype != F32:
        assert exact is not None, "a 16-bit comparison needs the float64 results"
        out_64, grads_64 = exact
        for tag, (o, g) in (("ours", got), ("peft", expected)):
            assert_close(o, out_64, dtype, f"{tag}: output")
            for name in grads:
                assert_close(g[name], grads_64[name], dtype, f"{tag}: grad of {name}")
        return
    assert_close(out, out_ref, dtype, "output")
    for name in grads:
        assert_close(grads[name], grads_ref[name], dtype, f"grad of {name}")


def float64_results(model, x):
    """forward_backward of a float64 copy of `model` on x in float64."""
    return forward_backward(copy.deepcopy(model).double(), x.double())


# ----------------------------------------------------------------------------------------
# peft's format, both ways
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".weight"], ids=["peft-key", "key.weight"])
def test_peft_dora_adapter_loads_with_the_same_outputs_and_grads(tmp_path, suffix):
    reference = peft_dora_net(dropout=0.1)
    reference.save_pretrained(tmp_path)
    weights = safetensors_torch.load_file(str(tmp_path / WEIGHTS))
    assert "base_model.model.q.lora_magnitude_vector" in weights
    if suffix:
        # peft also loads the magnitude under its in-memory name's ".weight".
        weights = {
            k + suffix if k.endswith("lora_magnitude_vector") else k: v for k, v in weights.items()
        }
        safetensors_torch.save_file(weights, str(tmp_path / WEIGHTS))
    model = load_adapter(base_net(), tmp_path)
    layers = dict(lora_layers(model))
    assert sorted(layers) == ["q", "v"] and all(layer.use_dora for layer in layers.values())
    peft_q = reference.base_model.model.q
    assert torch.equal(layers["q"].lora_magnitude, peft_q.lora_magnitude_vector["default"].weight)
    assert layers["q"].dropout == 0.1
    model.eval()
    reference.eval()
    assert_same_results(forward_backward(model, inputs()), forward_backward(reference, inputs()))


@pytest.mark.parametrize("dtype", [F32, BF16], ids=[DTYPE_IDS[F32], DTYPE_IDS[BF16]])
def test_our_dora_adapter_loads_in_peft_with_the_same_outputs_and_grads(tmp_path, dtype):
    model = our_dora_net(dtype=dtype).eval()
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    weights = safetensors_torch.load_file(str(tmp_path / WEIGHTS))
    assert sorted(k for k in weights if "magnitude" in k) == [
        "base_model.model.q.lora_magnitude_vector",
        "base_model.model.v.lora_magnitude_vector",
    ]
    assert weights["base_model.model.q.lora_magnitude_vector"].dtype == F32
    theirs = PeftModel.from_pretrained(base_net(dtype=dtype), tmp_path, is_trainable=True).eval()
    magnitude = theirs.base_model.model.q.lora_magnitude_vector["default"].weight
    assert torch.equal(magnitude, dict(lora_layers(model))["q"].lora_magnitude)
    x = inputs(dtype=dtype)
    exact = float64_results(theirs, x) if dtype != F32 else None
    assert_same_results(forward_backward(model, x), forward_backward(theirs, x), dtype, exact)


def test_dora_and_plain_adapters_do_not_load_into_each_other(tmp_path):
    model = our_dora_net()
    save_adapter(model, tmp_path / "dora")
    plain = base_net()
    apply_lora(plain, rank=3, alpha=6, target_modules=["q", "v"])
    save_adapter(plain, tmp_path / "plain")
    # The config says DoRA, the weights have no magnitude: refused, the model unchanged.
    plain_config = tmp_path / "plain" / "adapter_config.json"
    plain_config.write_text(json.dumps({**json.loads(plain_config.read_text()), "use_dora": True}))
    target = base_net()
    with pytest.raises(ValueError, match=r"use_dora true, .*no DoRA magnitude .*\['q', 'v'\]"):
        load_adapter(target, tmp_path / "plain")
    # Magnitudes with use_dora false.
    dora_config = tmp_path / "dora" / "adapter_config.json"
    config = json.loads(dora_config.read_text())
    dora_config.write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(ValueError, match=r"DoRA magnitudes .*\['q', 'v'\], but the config has"):
        load_adapter(target, tmp_path / "dora")
    assert not list(lora_layers(target))
    # A magnitude of the wrong length names the module and both shapes.
    dora_config.write_text(json.dumps(config))
    weights = safetensors_torch.load_file(str(tmp_path / "dora" / WEIGHTS))
    weights["base_model.model.v.lora_magnitude_vector"] = torch.ones(6)
    safetensors_torch.save_file(weights, str(tmp_path / "dora" / WEIGHTS))
    with pytest.raises(ValueError, match=r"'v': lora_magnitude_vector has shape \[6\], exp"):
        load_adapter(target, tmp_path / "dora")
    # lora_state_dict between DoRA and plain layers says what disagrees.
    with pytest.raises(ValueError, match=r"missing keys \['q.lora_magnitude'.*disagree on use_"):
        lora_kernels.load_lora_state_dict(model, lora_state_dict(plain))
    with pytest.raises(ValueError, match=r"unexpected keys \['q.lora_magnitude'.*use_dora"):
        lora_kernels.load_lora_state_dict(plain, lora_state_dict(model))


def test_save_adapter_refuses_mixed_and_merged_dora_layers(tmp_path):
    model = base_net()
    apply_lora(model, rank=3, alpha=6, target_modules=["q"], use_dora=True)
    apply_lora(model, rank=3, alpha=6, target_modules=["v"])
    with pytest.raises(ValueError, match=r"one use_dora for all layers.*'q': True, 'v': False"):
        save_adapter(model, tmp_path)
    model = our_dora_net()
    dict(lora_layers(model))["v"].merge()
    with pytest.raises(ValueError, match=r"'v' is a merged DoRA layer.*unmerge\(\) it first"):
        save_adapter(model, tmp_path)
    assert not (tmp_path / WEIGHTS).exists()


# ----------------------------------------------------------------------------------------
# patch_peft serves peft's DoRA
# ----------------------------------------------------------------------------------------


class DoraCalls:
    """Counts dora_linear calls by patched modules and peft's own DoRA forwards."""

    def __init__(self, monkeypatch):
        self.ours = self.peft = 0
        original_op = peft_patch.dora_linear
        original_peft = peft_dora.DoraLinearLayer.forward

        def counting_op(*args, **kwargs):
            self.ours += 1
            return original_op(*args, **kwargs)

        def counting_peft(*args, **kwargs):
            self.peft += 1
            return original_peft(*args, **kwargs)

        monkeypatch.setattr(peft_patch, "dora_linear", counting_op)
        monkeypatch.setattr(peft_dora.DoraLinearLayer, "forward", counting_peft)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=[DTYPE_IDS[F32], DTYPE_IDS[BF16]])
def test_patched_peft_dora_runs_dora_linear_and_matches_peft(monkeypatch, dtype):
    reference = peft_dora_net(dropout=0.1, dtype=dtype)
    assert reference.base_model.model.q.lora_A["default"].weight.dtype == F32
    model = copy.deepcopy(reference)
    report = patch_peft(model)
    assert report.dora_served == ["base_model.model.q [default]", "base_model.model.v [default]"]
    assert sorted(report.patched) == ["base_model.model.q", "base_model.model.v"]
    assert not report.adapters_not_served and not report.not_patched
    assert "  DoRA: 2 adapter(s) run dora_linear" in str(report)
    model.eval()
    reference.eval()
    calls = DoraCalls(monkeypatch)
    x = inputs(dtype=dtype)
    got = forward_backward(model, x)
    assert (calls.ours, calls.peft) == (2, 0)
    expected = forward_backward(reference, x)
    assert (calls.ours, calls.peft) == (2, 2)
    exact = float64_results(reference, x) if dtype != F32 else None
    assert_same_results(got, expected, dtype, exact)
    assert (report.calls.fused, report.calls.dora) == (2, 2)
    assert "calls since patching: 2 fused (2 DoRA), 0 by peft" in str(report)


def test_patched_peft_dora_with_dropout_matches_peft_given_our_mask(monkeypatch):
    # One target: one seed drawn per forward, the mask that plain_op_mask reads off.
    reference = peft_dora_net(dropout=0.1, targets=("q",)).train()
    model = copy.deepcopy(reference)
    patch_peft(model)
    x = inputs(shape=(3, 11, 13))
    keep = plain_op_mask(33, 13, 0.1, 11)  # forward_backward seeds 11
    assert not keep.all()
    reference.base_model.model.q.lora_dropout["default"] = FixedMaskDropout(keep, 0.1)
    calls = DoraCalls(monkeypatch)
    assert_same_results(forward_backward(model, x), forward_backward(reference, x))
    assert (calls.ours, calls.peft) == (1, 1)


def test_patched_peft_dora_drops_nothing_while_the_layer_is_in_eval(monkeypatch):
    """peft's DoRA applies lora_dropout only while the layer itself trains; a dropout
    module left in training mode under an eval layer drops nothing there."""
    reference = peft_dora_net(dropout=0.5).eval()
    model = copy.deepcopy(reference)
    patch_peft(model)
    for m in (model, reference):
        for layer in (m.base_model.model.q, m.base_model.model.v):
            layer.lora_dropout["default"].train()
    calls = DoraCalls(monkeypatch)
    for seed in (11, 12):
        torch.manual_seed(seed)
        out = model(inputs())
        assert rel_error(out, reference(inputs())) <= FP32_TOL
    assert calls.ours == 4


def test_patched_peft_dora_pickles_copies_and_replicates(monkeypatch):
    from test_peft_interop import replicate_on_cpu

    reference = peft_dora_net()
    model = copy.deepcopy(reference)
    patch_peft(model)
    x = inputs()
    model(x)  # fills the caches
    caches = model.base_model.model.q.__dict__[peft_patch._NORM_CACHES_ATTR]
    assert caches["default"]._value is not None
    calls = DoraCalls(monkeypatch)
    # A pickle and a deep copy carry empty caches and run their own weights.
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        q = clone.base_model.model.q
        assert type(q).__name__ == "PatchedLoraLinear"
        assert q.__dict__[peft_patch._NORM_CACHES_ATTR]["default"]._value is None
        with torch.no_grad():
            q.base_layer.weight.mul_(1.5)
        expected = copy.deepcopy(clone)
        unpatch_peft(expected)
        assert_same_results(forward_backward(clone, x), forward_backward(expected, x))
    assert calls.ours == 4
    # A data-parallel replica (its own weights, the original's instance attributes)
    # computes the norm from its own weights, caching nothing.
    replica = replicate_on_cpu(model, lambda p: p * 1.5 + 0.01)
    replica_ref = replicate_on_cpu(reference, lambda p: p * 1.5 + 0.01)
    assert peft_patch._norm_cache(replica.base_model.model.q, "default") is None
    assert rel_error(replica(x), replica_ref(x)) <= FP32_TOL
    assert calls.ours == 6
    assert rel_error(model(x), reference(x)) <= FP32_TOL


def test_patched_peft_merge_and_unmerge_drop_the_norm_cache(monkeypatch):
    reference = peft_dora_net()
    model = copy.deepcopy(reference)
    patch_peft(model)
    x = inputs()
    model(x)
    cache = model.base_model.model.q.__dict__[peft_patch._NORM_CACHES_ATTR]["default"]
    assert cache._value is not None
    for m in (model, reference):
        m.merge_adapter()
    assert cache._value is None
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))  # merged: peft's base layer serves both
    model(x)
    for m in (model, reference):
        m.unmerge_adapter()
    # peft's unmerge swaps the storage (weight.data = ...) and keeps the version counter.
    assert cache._value is None
    assert rel_error(model(x), reference(x)) <= FP32_TOL
    assert unpatch_peft(model) == ["base_model.model.q", "base_model.model.v"]
    assert peft_patch._NORM_CACHES_ATTR not in model.base_model.model.q.__dict__


def test_other_lora_variants_still_fall_back():
    from peft.tuners.lora import variants

    class OwnDora(variants.DoraLinearVariant):
        pass

    model = peft_dora_net()
    model.base_model.model.q.lora_variant["default"] = OwnDora()
    report = patch_peft(model)
    assert report.not_patched["base_model.model.q"] == (
        "adapter 'default': LoRA variant OwnDora (not peft's own DoRA)"
    )
    assert report.dora_served == ["base_model.model.v [default]"]


# ----------------------------------------------------------------------------------------
# merge, unmerge, merge_weights, merge_lora
# ----------------------------------------------------------------------------------------


def dora_layer(dtype=F32, seed=0):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(23, 17, dtype=dtype), rank=4, alpha=6, use_dora=True)
    randomize_dora(layer.named_parameters(), seed + 1)
    return layer.eval()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=[DTYPE_IDS[F32], DTYPE_IDS[BF16]])
def test_merged_dora_layer_gives_the_unmerged_output_and_peft_merged_weight(dtype, tmp_path):
    layer = dora_layer(dtype)
    x = inputs(shape=(6, 23), dtype=dtype)
    with torch.no_grad():
        expected = layer(x)
        weight = layer.original_linear.weight.clone()
        fresh = layer.merge_weights()
        assert torch.equal(layer.original_linear.weight, weight)  # merge_weights: a copy
        layer.merge()
        assert layer.merged and "merged=True" in repr(layer)
        assert torch.equal(layer.original_linear.weight, fresh.weight)
        assert_close(layer(x), expected, dtype, "merged output")
        assert_close(layer.merge_weights()(x), expected, dtype, "merge_weights of a merged layer")
    # peft's DoRA merge of the same adapter gives the same weight.
    model = nn.Sequential()
    model.add_module("lin", copy.deepcopy(layer))
    model.lin.unmerge()
    save_adapter(model, tmp_path)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(23, 17, dtype=dtype))
    with torch.no_grad():
        base.lin.load_state_dict(model.lin.original_linear.state_dict())
    theirs = PeftModel.from_pretrained(base, tmp_path).merge_and_unload()
    assert_close(layer.original_linear.weight, theirs.lin.weight, dtype, "peft's merged weight")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=[DTYPE_IDS[F32], DTYPE_IDS[BF16]])
def test_unmerge_restores_the_weight_within_rounding(dtype):
    """Not bit for bit: W' = (m/n)(W + sBA) and W'/(m/n) - sBA each round to W's dtype;
    each element stays within 4 units in the last place of max(|W|, |W + sBA|)."""
    layer = dora_layer(dtype)
    weight = layer.original_linear.weight.detach().double().clone()
    update = layer._delta(F32).double()
    layer.merge()
    layer.unmerge()
    assert not layer.merged and layer._dora_merge_scale is None
    restored = layer.original_linear.weight.double()
    ulp = torch.finfo(dtype).eps * torch.maximum(weight.abs(), (weight + update).abs())
    error = (restored - weight).abs()
    assert (error <= 4 * ulp).all(), float((error / ulp).max())
    # Nor is it exact in general: the round trip moves some elements.
    assert not torch.equal(restored, weight)


def test_merge_lora_folds_dora_layers_and_disabling_a_merged_layer_unmerges():
    model = our_dora_net().eval()
    x = inputs()
    with torch.no_grad():
        expected = model(x)
        layer = dict(lora_layers(model))["q"]
        layer.merge()
        layer.enabled = False  # takes the update back out
        assert not layer.merged
        assert torch.equal(layer(x[0, :, :13]), layer.original_linear(x[0, :, :13]))
        layer.enabled = True
        merge_lora(model)
        assert not list(lora_layers(model)) and type(model.q) is nn.Linear
        assert_close(model(x), expected, F32, "merge_lora output")


def test_merge_refuses_a_zero_magnitude_that_unmerge_could_not_divide_out():
    layer = dora_layer()
    with torch.no_grad():
        layer.lora_magnitude[[2, 5]] = 0
    weight = layer.original_linear.weight.clone()
    with pytest.raises(ValueError, match=r"m/n is 0 on row\(s\) \[2, 5\]"):
        layer.merge()
    assert torch.equal(layer.original_linear.weight, weight) and not layer.merged
    assert (layer.merge_weights().weight[[2, 5]] == 0).all()


def _no_invalidation(monkeypatch):
    """The cache as it would be with no invalidation at all: no clear() from the layer,
    and a key blind to the weight's version and storage."""
    monkeypatch.setattr(LoRALinear, "_weight_changed", lambda self: None)
    monkeypatch.setattr(dora.WeightNormCache, "_key_of", staticmethod(lambda weight: ("fixed",)))


def _round_trip(layer):
    layer.merge()
    layer.unmerge()


def _load_weight(layer):
    state = layer.state_dict()
    state["original_linear.weight"] = state["original_linear.weight"] * 1.25
    layer.load_state_dict(state)


@pytest.mark.parametrize("change", [_round_trip, _load_weight], ids=["merge-unmerge", "load"])
@pytest.mark.parametrize("invalidation", ["on", "removed"])
def test_the_norm_cache_never_serves_a_stale_weight(monkeypatch, change, invalidation):
    """After a merge/unmerge round trip (W moves by rounding) or a state-dict load, the
    output equals, bit for bit, one computed with no cache; with the invalidation taken
    away ("removed") the same check fails, so it would catch a stale cache."""
    if invalidation == "removed":
        _no_invalidation(monkeypatch)
    layer = dora_layer()
    x = inputs(shape=(6, 23))
    with torch.no_grad():
        layer(x)  # fills the cache
        before = layer.original_linear.weight.clone()
        change(layer)
        assert not torch.equal(layer.original_linear.weight, before)
        w = layer.original_linear.weight
        uncached = lora_kernels.dora_linear(
            x, w, layer.original_linear.bias, layer.lora_A, layer.lora_B,
            layer.lora_magnitude, layer.scaling, training=False,
        )  # fmt: skip
        same = torch.equal(layer(x), uncached)
    assert same == (invalidation == "on")


def test_patched_peft_dora_under_autocast_and_compile(monkeypatch):
    reference = peft_dora_net().eval()
    model = copy.deepcopy(reference)
    patch_peft(model)
    x = inputs()
    calls = DoraCalls(monkeypatch)
    with torch.autocast("cpu", dtype=BF16):
        out, out_ref = model(x), reference(x)
    assert out.dtype == out_ref.dtype == BF16
    assert_close(out, out_ref, BF16, "output under bf16 autocast")
    assert (calls.ours, calls.peft) == (2, 2)
    # Not fullgraph: dora.weight_row_norm branches on the data (its cancellation guard).
    compiled = torch.compile(model, backend="eager")
    for seed in range(3):
        assert_same_results(
            forward_backward(compiled, inputs(seed)), forward_backward(reference, inputs(seed))
        )


def test_tiny_llama_dora_adapter_round_trips_between_peft_and_apply_lora(tmp_path):
    from tiny_models import LLAMA_TARGETS, llama_batch, tiny_llama

    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True)
    reference = get_peft_model(tiny_llama(), config).eval()
    randomize_dora(reference.named_parameters())
    reference.save_pretrained(tmp_path / "peft")
    ours = load_adapter(tiny_llama(), tmp_path / "peft").eval()
    assert len(list(lora_layers(ours))) == 8
    batch = llama_batch()
    with torch.no_grad():
        logits_ref = reference(**batch).logits
        assert_close(ours(**batch).logits, logits_ref, F32, "peft -> load_adapter")
        save_adapter(ours, tmp_path / "ours")
        back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
        assert_close(back(**batch).logits, logits_ref, F32, "save_adapter -> peft")
