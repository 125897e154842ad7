"""peft interop on a small custom model: the adapter format both ways, and patch_peft."""

from __future__ import annotations

import copy
import json
import sys
import warnings

import pytest
import torch
from helpers import FP32_TOL, LoraLinearCalls, rel_error
from torch import nn

import lora_kernels
import lora_kernels.adapter_format as adapter_format
import lora_kernels.peft_patch as peft_patch
from lora_kernels import (
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    patch_peft,
    save_adapter,
    unpatch_peft,
)

peft = pytest.importorskip("peft", reason="peft is not installed (an optional dependency)")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors not installed")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.v = nn.Linear(16, 16, bias=False)
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)

    def forward(self, h):
        h = h + self.v(torch.tanh(self.q(h)))
        return h + self.down(torch.relu(self.up(h)))


class Tiny(nn.Module):
    """Embedding, two blocks, a head: module names like a transformer's."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 5)

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny()


def ids(seed=1, shape=(3, 7)):
    return torch.randint(0, 20, shape, generator=torch.Generator().manual_seed(seed))


def randomize(model, seed=5, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_tiny(config, seed=0):
    model = get_peft_model(tiny(seed), config)
    randomize(model)
    return model


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------
# save_adapter / load_adapter
# ----------------------------------------------------------------------------------------


def our_model_with_patterns():
    """apply_lora twice: q/v rank 4 alpha 8, up/down rank 2 alpha 6; B random."""
    model = tiny()
    apply_lora(model, rank=4, alpha=8, dropout=0.05, target_modules=["q", "v"])
    apply_lora(model, rank=2, alpha=6, dropout=0.05, target_modules=["blocks.1.up", "down"])
    randomize(model)
    return model


def test_save_adapter_writes_peft_config_and_keys(tmp_path):
    model = our_model_with_patterns()
    save_adapter(model, tmp_path, base_model_name_or_path="tiny/base", task_type="CAUSAL_LM")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "tiny/base"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert config["use_rslora"] is False
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False
    # blocks.0.up has no adapter, so the short name "up" would match too much.
    assert config["target_modules"] == sorted(
        [
            "blocks.0.q",
            "blocks.0.v",
            "blocks.1.q",
            "blocks.1.v",
            "blocks.1.up",
            "blocks.0.down",
            "blocks.1.down",
        ]
    )
    assert config["rank_pattern"] == {"blocks.1.up": 2, "blocks.0.down": 2, "blocks.1.down": 2}
    assert config["alpha_pattern"] == {"blocks.1.up": 6, "blocks.0.down": 6, "blocks.1.down": 6}

    tensors = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    expected = {}
    for name, layer in lora_layers(model):
        expected[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A
        expected[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B
    assert set(tensors) == set(expected)
    for key, param in expected.items():
        assert torch.equal(tensors[key], param.detach()), key
    assert tensors["base_model.model.blocks.1.up.lora_A.weight"].shape == (2, 16)
    assert tensors["base_model.model.blocks.1.up.lora_B.weight"].shape == (24, 2)
    assert tensors["base_model.model.blocks.0.v.lora_B.weight"].shape == (16, 4)


def test_save_adapter_looks_through_torch_compile(tmp_path):
    model = tiny()
    apply_lora(model, rank=4, alpha=8, target_modules=["q"])
    save_adapter(torch.compile(model), tmp_path)  # lazy: nothing is compiled here
    keys = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(keys) == sorted(
        f"base_model.model.blocks.{i}.q.lora_{p}.weight" for i in range(2) for p in "AB"
    )


def test_save_adapter_uses_short_target_names_when_they_match_exactly(tmp_path):
    model = tiny()
    apply_lora(model, rank=4, alpha=8, target_modules=["q", "v"])
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q", "v"]
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    assert config["task_type"] is None


def test_saved_adapter_loads_in_peft_with_the_same_outputs(tmp_path):
    model = our_model_with_patterns().eval()
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny(), tmp_path).eval()
    x = ids()
    with torch.no_grad():
        ours, theirs = model(x), peft_model(x)
    assert rel_error(ours, theirs) <= FP32_TOL
    # peft built the per-module ranks and scalings from rank_pattern / alpha_pattern.
    for name, layer in lora_layers(model):
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert peft_layer.r["default"] == layer.rank, name
        assert peft_layer.scaling["default"] == layer.scaling, name
        assert torch.equal(peft_layer.lora_A["default"].weight, layer.lora_A.detach()), name
        assert torch.equal(peft_layer.lora_B["default"].weight, layer.lora_B.detach()), name


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_load_adapter_reads_peft_save_pretrained(tmp_path, use_rslora):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        target_modules=["q", "v", "down"],
        rank_pattern={"blocks.1.q": 2},
        alpha_pattern={"down": 3},
        use_rslora=use_rslora,
    )
    peft_model = peft_tiny(config).eval()
    peft_model.save_pretrained(tmp_path)

    model = load_adapter(tiny(), tmp_path).eval()
    layers = dict(lora_layers(model))
    assert sorted(layers) == sorted(f"blocks.{i}.{m}" for i in range(2) for m in ("q", "v", "down"))
    for name, layer in layers.items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert layer.rank == (2 if name == "blocks.1.q" else 4), name
        assert layer.alpha == (3 if name.endswith("down") else 8), name
        assert layer.use_rslora is use_rslora and layer.dropout == 0.1
        assert layer.scaling == peft_layer.scaling["default"], name
        assert layer.scaling == layer.alpha / (layer.rank**0.5 if use_rslora else layer.rank)
        assert torch.equal(layer.lora_A.detach(), peft_layer.lora_A["default"].weight), name
        assert torch.equal(layer.lora_B.detach(), peft_layer.lora_B["default"].weight), name
    x = ids()
    with torch.no_grad():
        assert rel_error(model(x), peft_model(x)) <= FP32_TOL
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{p}" for n in layers for p in "AB"}


def test_save_then_load_round_trip_is_exact(tmp_path):
    model = our_model_with_patterns().eval()
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny(), tmp_path).eval()
    ours = dict(lora_layers(model))
    theirs = dict(lora_layers(loaded))
    assert sorted(ours) == sorted(theirs)
    for name, layer in ours.items():
        other = theirs[name]
        assert (other.rank, other.alpha, other.dropout, other.scaling) == (
            layer.rank,
            layer.alpha,
            layer.dropout,
            layer.scaling,
        )
        assert torch.equal(other.lora_A, layer.lora_A) and torch.equal(other.lora_B, layer.lora_B)
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_load_adapter_half_base_keeps_float32_adapter(tmp_path):
    model = our_model_with_patterns()
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny().to(torch.bfloat16), tmp_path)
    for name, layer in lora_layers(loaded):
        assert layer.lora_A.dtype == torch.float32, name
        assert torch.equal(layer.lora_A, dict(lora_layers(model))[name].lora_A)


def test_load_adapter_leaves_the_rng_alone(tmp_path):
    save_adapter(our_model_with_patterns(), tmp_path)
    base = tiny()
    torch.manual_seed(123)
    load_adapter(base, tmp_path)
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(4))


def _write(tmp_path, config_changes=None, tensors=None):
    """A valid adapter directory (ours) with config entries changed / tensors replaced."""
    model = tiny()
    apply_lora(model, rank=4, alpha=8, target_modules=["q"])
    save_adapter(model, tmp_path)
    if config_changes:
        path = tmp_path / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(config_changes)
        path.write_text(json.dumps(config))
    if tensors is not None:
        weights = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
        weights.update(tensors)
        safetensors_torch.save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    return tmp_path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_dora": True}, r"use_dora true, but .* holds no DoRA magnitude"),
        ({"lora_bias": True}, r"entry 'lora_bias' = True is not supported"),
        ({"bias": "all"}, r"entry 'bias' = 'all' is not supported"),
        (
            {"modules_to_save": ["head"]},
            r"'head' is in modules_to_save \(\['head'\]\), but .* no "
            r"'base_model.model.head.weight'",
        ),
        ({"fan_in_fan_out": True}, r"entry 'fan_in_fan_out' = True .*Conv1D"),
        ({"init_lora_weights": "pissa"}, r"entry 'init_lora_weights' = 'pissa' .*base weights"),
        ({"init_lora_weights": "olora"}, r"entry 'init_lora_weights' = 'olora'"),
        ({"init_lora_weights": "pissa_niter_4"}, r"entry 'init_lora_weights' = 'pissa_niter_4'"),
        ({"layer_replication": [[0, 1]]}, r"entry 'layer_replication'"),
        ({"some_future_option": 3}, r"entry 'some_future_option' = 3 .*does not know"),
        ({"peft_type": "LOHA"}, r"entry 'peft_type' must be 'LORA', got 'LOHA'"),
    ],
    ids=[
        "dora",
        "lora_bias",
        "bias-all",
        "modules_to_save",
        "fan_in_fan_out",
        "pissa",
        "olora",
        "pissa-niter",
        "layer_replication",
        "unknown",
        "peft_type",
    ],
)
def test_load_adapter_rejects_unsupported_config_entries(tmp_path, changes, message):
    path = _write(tmp_path, config_changes=changes)
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_adapter(model, path)
    # Refused before anything changed.
    assert not list(lora_layers(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_adapter_reads_peft_dora_directory(tmp_path):
    # Outputs and gradients against peft: tests/test_dora_interop.py.
    peft_tiny(LoraConfig(r=4, target_modules=["q"], use_dora=True)).save_pretrained(tmp_path)
    layers = dict(lora_layers(load_adapter(tiny(), tmp_path)))
    assert sorted(layers) == ["blocks.0.q", "blocks.1.q"]
    assert all(layer.use_dora for layer in layers.values())


def test_load_adapter_rejects_peft_lora_bias_directory(tmp_path):
    peft_tiny(LoraConfig(r=4, target_modules=["q"], lora_bias=True)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'lora_bias' = True"):
        load_adapter(tiny(), tmp_path)


def test_load_adapter_rejects_peft_embedding_target(tmp_path):
    peft_tiny(LoraConfig(r=4, target_modules=["embed", "q"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"lora_embedding_A.*embedding, which is not supported"):
        load_adapter(tiny(), tmp_path)


def test_load_adapter_rejects_peft_pissa_init(tmp_path):
    config = LoraConfig(r=2, target_modules=["q"], init_lora_weights="pissa")
    peft_tiny(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'init_lora_weights' = 'pissa'"):
        load_adapter(tiny(), tmp_path)


def test_load_adapter_shape_mismatch_names_module_and_both_shapes(tmp_path):
    path = _write(tmp_path, tensors={"base_model.model.blocks.1.q.lora_A.weight": torch.ones(4, 9)})
    with pytest.raises(
        ValueError, match=r"'blocks\.1\.q': lora_A\.weight has shape \[4, 9\], expected \[4, 16\]"
    ):
        load_adapter(tiny(), path)


def test_load_adapter_rank_mismatch_with_config_names_module(tmp_path):
    path = _write(tmp_path, config_changes={"r": 3})
    with pytest.raises(
        ValueError, match=r"'blocks\.0\.q': lora_A\.weight has shape \[4, 16\], expected \[3, 16\]"
    ):
        load_adapter(tiny(), path)


def test_load_adapter_unknown_module_and_non_linear_target(tmp_path):
    path = _write(
        tmp_path, tensors={"base_model.model.blocks.0.w.lora_A.weight": torch.ones(4, 16)}
    )
    with pytest.raises(ValueError, match=r"'blocks\.0\.w' has no base_model\.model\.blocks\.0\.w"):
        load_adapter(tiny(), path)
    path = _write(
        tmp_path,
        tensors={
            "base_model.model.blocks.0.w.lora_A.weight": torch.ones(4, 16),
            "base_model.model.blocks.0.w.lora_B.weight": torch.ones(16, 4),
        },
    )
    with pytest.raises(ValueError, match=r"'blocks\.0\.w', which is not a module of the model"):
        load_adapter(tiny(), path)
    model = tiny()
    model.blocks[0].q = nn.Conv1d(16, 16, 1)
    with pytest.raises(TypeError, match=r"'blocks\.0\.q' is a Conv1d; only torch\.nn\.Linear"):
        load_adapter(model, _write(tmp_path))


def test_load_adapter_refuses_a_model_that_already_has_the_adapter(tmp_path):
    path = _write(tmp_path)
    model = load_adapter(tiny(), path)
    with pytest.raises(ValueError, match=r"'blocks\.0\.q' is already a LoRALinear"):
        load_adapter(model, path)


def test_load_adapter_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(tiny(), tmp_path)
    path = _write(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither adapter_model.safetensors nor"):
        load_adapter(tiny(), path)


def test_save_adapter_refuses_what_peft_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="has no LoRALinear"):
        save_adapter(tiny(), tmp_path)
    model = tiny()
    apply_lora(model, rank=4, alpha=8, target_modules=["q"], learnable_scaling=True)
    with pytest.raises(ValueError, match=r"'blocks\.0\.q' has a learnable scaling"):
        save_adapter(model, tmp_path)
    model = tiny()
    apply_lora(model, rank=4, alpha=8, target_modules=["q"], init="svd")
    with pytest.raises(ValueError, match=r"'blocks\.0\.q' was initialised with init='svd'"):
        save_adapter(model, tmp_path)
    model = tiny()
    apply_lora(model, rank=4, alpha=8, dropout=0.1, target_modules=["q"])
    apply_lora(model, rank=4, alpha=8, dropout=0.2, target_modules=["v"])
    with pytest.raises(ValueError, match=r"one dropout for all layers.*'blocks\.0\.v': 0\.2"):
        save_adapter(model, tmp_path)
    model = tiny()
    apply_lora(model, rank=4, alpha=8, target_modules=["q"])
    with pytest.raises(ValueError, match=r"task_type must be None or one of"):
        save_adapter(model, tmp_path, task_type="causal")
    assert not (tmp_path / "adapter_config.json").exists()


# ----------------------------------------------------------------------------------------
# patch_peft
# ----------------------------------------------------------------------------------------


def forward_backward(model, x, seed=11):
    torch.manual_seed(seed)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), lora_grads(model)


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["p0", "p0.2"])
def test_patched_peft_matches_peft_in_eval_and_at_p0(monkeypatch, dropout):
    """p=0 training, and eval with p>0: the fused op gives peft's output and grads."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q", "v", "up"])
    reference = peft_tiny(config)
    patched = copy.deepcopy(reference)
    if dropout > 0:
        reference.eval()
        patched.eval()
    counter = LoraLinearCalls(monkeypatch)
    report = patch_peft(patched)
    assert sorted(report.patched) == sorted(
        f"base_model.model.blocks.{i}.{m}" for i in range(2) for m in ("q", "v", "up")
    )
    assert report.not_patched == {}
    x = ids()
    out_ref, grads_ref = forward_backward(reference, x)
    state = torch.random.get_rng_state()
    out, grads = forward_backward(patched, x)
    assert counter.calls == 6
    assert rel_error(out, out_ref) <= FP32_TOL
    assert sorted(grads) == sorted(grads_ref) and len(grads) == 12
    for name in grads:
        assert rel_error(grads[name], grads_ref[name]) <= FP32_TOL, name
    if dropout > 0:
        # Eval mode draws no dropout seed.
        torch.manual_seed(11)
        assert torch.equal(torch.random.get_rng_state(), state)


def test_patched_peft_with_dropout_equals_apply_lora_bit_for_bit():
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q", "v", "down"])
    patched = peft_tiny(config)
    patch_peft(patched)
    ours = tiny()
    apply_lora(ours, rank=4, alpha=8, dropout=0.3, target_modules=["q", "v", "down"])
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            peft_layer = patched.base_model.model.get_submodule(name)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
    x = ids()
    out, grads = forward_backward(patched, x)
    out_ours, grads_ours = forward_backward(ours, x)
    assert torch.equal(out, out_ours)
    for name, grad in grads.items():
        key = name.removeprefix("base_model.model.").replace(".default.weight", "")
        assert torch.equal(grad, grads_ours[key]), name
    # And the mask is a real one: another seed gives another output.
    torch.manual_seed(12)
    assert not torch.equal(patched(x).detach(), out)


def test_patched_peft_training_mode_dropout_follows_the_module(monkeypatch):
    """peft's nn.Dropout decides: model.train() drops, model.eval() does not."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q"])
    model = peft_tiny(config)
    reference = copy.deepcopy(model).eval()
    patch_peft(model)
    x = ids()
    with torch.no_grad():
        torch.manual_seed(0)
        train_out = model.train()(x)
        eval_out = model.eval()(x)
        assert rel_error(eval_out, reference(x)) <= FP32_TOL
        assert rel_error(train_out, eval_out) > 1e-3


def test_patched_peft_disabled_merged_and_mixed_batches_are_peft(monkeypatch):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    reference = peft_tiny(config).eval()
    patched = copy.deepcopy(reference)
    patch_peft(patched)
    counter = LoraLinearCalls(monkeypatch)
    x = ids()
    with torch.no_grad():
        with reference.disable_adapter(), patched.disable_adapter():
            base_ref, base_out = reference(x), patched(x)
        assert counter.calls == 0
        assert torch.equal(base_out, base_ref)
        assert torch.equal(base_out, tiny()(x))

        reference.merge_adapter()
        patched.merge_adapter()
        assert torch.equal(patched(x), reference(x))
        assert counter.calls == 0
        reference.unmerge_adapter()
        patched.unmerge_adapter()

        # adapter_names: peft's mixed-batch path, served by peft itself.
        names = ["default", "__base__", "default"]
        assert torch.equal(patched(x, adapter_names=names), reference(x, adapter_names=names))
        assert counter.calls == 0

        assert rel_error(patched(x), reference(x)) <= FP32_TOL
        assert counter.calls == 4


def test_patched_peft_follows_the_active_adapter(monkeypatch):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"])
    reference = peft_tiny(config).eval()
    reference.add_adapter("other", LoraConfig(r=2, lora_alpha=2, target_modules=["q"]))
    randomize(reference, seed=9)
    patched = copy.deepcopy(reference)
    report = patch_peft(patched)
    assert len(report.patched) == 4
    counter = LoraLinearCalls(monkeypatch)
    x = ids()
    with torch.no_grad():
        for adapter, fused_calls in (("other", 2), ("default", 4)):
            reference.set_adapter(adapter)
            patched.set_adapter(adapter)
            before = counter.calls
            assert rel_error(patched(x), reference(x)) <= FP32_TOL, adapter
            assert counter.calls - before == fused_calls, adapter
        # Two active adapters at once: peft sums them; its own forward does it.
        for model in (reference, patched):
            model.base_model.set_adapter(["default", "other"])
        before = counter.calls
        # v still runs fused (rounding differs from peft's composition), q falls back.
        assert rel_error(patched(x), reference(x)) <= FP32_TOL
        assert counter.calls - before == 2  # only v: q has two adapters


def test_patch_report_names_what_it_leaves_to_peft(monkeypatch):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["embed", "q", "v"])
    model = peft_tiny(config)
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["q"], use_dora=True))
    model.add_adapter("biased", LoraConfig(r=2, target_modules=["v"], lora_bias=True))
    report = patch_peft(model)
    assert "base_model.model.embed" in report.not_patched
    assert "not peft's lora.Linear" in report.not_patched["base_model.model.embed"]
    assert sorted(report.patched) == sorted(
        f"base_model.model.blocks.{i}.{m}" for i in range(2) for m in ("q", "v")
    )
    # peft's DoRA runs dora_linear (tests/test_dora_interop.py).
    assert report.dora_served == [f"base_model.model.blocks.{i}.q [dora]" for i in range(2)]
    assert not any("[dora]" in name for name in report.adapters_not_served)
    assert report.adapters_not_served["base_model.model.blocks.1.v [biased]"] == "lora_bias=True"
    assert "  not patched, 1 module(s):\n    1 x a peft.tuners.lora.layer.Embedding" in str(report)
    assert str(report).count("base_model.model.embed") == 1

    reference = copy.deepcopy(model)
    unpatch_peft(reference)
    counter = LoraLinearCalls(monkeypatch)
    x = ids()
    with torch.no_grad():
        # "biased" lives on v only: peft serves it, q has no active adapter (base
        # output), so nothing runs lora_linear; "dora" (on q) runs dora_linear.
        model.set_adapter("biased")
        reference.set_adapter("biased")
        assert torch.equal(model(x), reference(x))
        model.set_adapter("dora")
        reference.set_adapter("dora")
        assert rel_error(model(x), reference(x)) <= FP32_TOL
        assert counter.calls == 0
        model.set_adapter("default")
        reference.set_adapter("default")
        assert rel_error(model(x), reference(x)) <= FP32_TOL
        assert counter.calls == 4


def test_patch_report_for_modules_left_entirely_to_peft():
    """A GPT-2 style Conv1D base layer (fan_in_fan_out) is reported and keeps peft's
    forward, with DoRA too; the DoRA nn.Linear targets are patched."""
    from transformers.pytorch_utils import Conv1D

    model = tiny()
    model.blocks[0].up = Conv1D(24, 16)  # weight [K, N]: peft needs fan_in_fan_out
    config = LoraConfig(r=4, target_modules=["q", "up"], fan_in_fan_out=True, use_dora=True)
    with warnings.catch_warnings():
        # peft turns fan_in_fan_out off for the nn.Linear targets, with a warning.
        warnings.simplefilter("ignore", UserWarning)
        peft_model = get_peft_model(model, config)
    reference = copy.deepcopy(peft_model)
    report = patch_peft(peft_model)
    assert sorted(report.patched) == [
        "base_model.model.blocks.0.q",
        "base_model.model.blocks.1.q",
        "base_model.model.blocks.1.up",
    ]
    assert "its base layer is a Conv1D" in report.not_patched["base_model.model.blocks.0.up"]
    x = ids()
    assert rel_error(peft_model(x), reference(x)) <= FP32_TOL


def test_patched_peft_bf16_base_with_fp32_adapters():
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "up", "down"])
    reference = get_peft_model(tiny().to(torch.bfloat16), config, autocast_adapter_dtype=True)
    randomize(reference)
    assert reference.base_model.model.blocks[0].q.lora_A["default"].weight.dtype == torch.float32
    patched = copy.deepcopy(reference)
    patch_peft(patched)
    x = ids()
    out_ref, grads_ref = forward_backward(reference, x)
    out, grads = forward_backward(patched, x)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, out_ref) <= 1.5e-2
    for name in grads:
        assert grads[name].dtype == torch.float32
        assert rel_error(grads[name], grads_ref[name]) <= 3e-2, name


def test_patched_peft_under_autocast_runs_the_fused_op(monkeypatch):
    """float32 model under bf16 autocast: activations arrive in bf16 while the weights
    are float32; the patched layer casts like autocast does for peft's nn.Linear calls."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "up", "down"])
    reference = peft_tiny(config)
    patched = copy.deepcopy(reference)
    patch_peft(patched)
    counter = LoraLinearCalls(monkeypatch)
    x = ids()
    results = []
    for model in (reference, patched):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        results.append((out.detach(), lora_grads(model)))
    (out_ref, grads_ref), (out, grads) = results
    assert counter.calls == 8
    assert out.dtype == out_ref.dtype == torch.bfloat16
    assert rel_error(out, out_ref) <= 1.5e-2
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert rel_error(grad, grads_ref[name]) <= 3e-2, name


def one_patched_linear(base_dtype, adapter_dtype):
    """A patched peft lora.Linear [6, 8] with random adapters in `adapter_dtype`."""
    torch.manual_seed(0)
    model = get_peft_model(
        nn.Sequential(nn.Linear(8, 6)).to(base_dtype),
        LoraConfig(r=2, lora_alpha=4, target_modules=["0"]),
    )
    randomize(model)
    layer = model.base_model.model[0]
    layer.lora_A["default"].to(adapter_dtype)
    layer.lora_B["default"].to(adapter_dtype)
    patch_peft(model)
    return layer.eval()


@pytest.mark.parametrize(
    "base_dtype, adapter_dtype, x_dtype, autocast_dtype",
    [
        (torch.float32, torch.float32, torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32, torch.float32, torch.float16),
        (torch.float32, torch.float32, torch.float64, torch.bfloat16),
        (torch.float64, torch.float32, torch.float64, None),
        (torch.bfloat16, torch.float32, torch.bfloat16, None),
    ],
    ids=[
        "fp32-model-bf16-autocast",
        "bf16-model-fp32-x-fp16-autocast",
        "fp32-model-fp64-x-bf16-autocast",
        "fp64-model-fp32-adapters",
        "bf16-model-fp32-adapters",
    ],
)
def test_patched_forward_casts_and_takes_dtypes_as_lora_linear(
    monkeypatch, base_dtype, adapter_dtype, x_dtype, autocast_dtype
):
    """The patched forward serves every call lora_linear takes after its own autocast
    cast, float32 adapters with float64 x included, with lora_linear's exact output."""
    layer = one_patched_linear(base_dtype, adapter_dtype)
    counter = LoraLinearCalls(monkeypatch)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(3)).to(x_dtype)
    enabled = autocast_dtype is not None
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast_dtype, enabled=enabled):
        out = layer(x)
        expected = lora_kernels.lora_linear(
            x,
            layer.base_layer.weight,
            layer.base_layer.bias,
            layer.lora_A["default"].weight,
            layer.lora_B["default"].weight,
            layer.scaling["default"],
        )
    assert counter.calls == 1
    assert out.dtype == expected.dtype
    assert torch.equal(out, expected)


def test_patched_forward_leaves_non_float_input_under_autocast_to_peft(monkeypatch):
    """Autocast casts floating-point tensors only; an int64 x is peft's to refuse."""
    layer = one_patched_linear(torch.float32, torch.float32)
    counter = LoraLinearCalls(monkeypatch)
    x = torch.randint(0, 3, (5, 8))
    errors = []
    peft_forward = type(layer)._lora_kernels_peft_class.forward
    for forward in (layer.forward, peft_forward.__get__(layer)):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(RuntimeError) as error:
                forward(x)
        errors.append(str(error.value))
    assert counter.calls == 0
    assert errors[0] == errors[1]


def test_patch_keeps_module_tree_parameter_names_and_save_pretrained(tmp_path):
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q", "v"])
    model = peft_tiny(config)
    before_modules = [(n, type(m)) for n, m in model.named_modules()]
    before_params = [n for n, _ in model.named_parameters()]
    model.save_pretrained(tmp_path / "before")
    report = patch_peft(model)
    # The patched modules' class is a subclass of peft's; nothing else changes type.
    assert [n for n, _ in model.named_modules()] == [n for n, _ in before_modules]
    for (name, before), (_, after) in zip(before_modules, model.named_modules(), strict=True):
        if name in report.patched:
            assert type(after) is peft_patch.PatchedLoraLinear and isinstance(after, before)
        else:
            assert type(after) is before, name
    assert [n for n, _ in model.named_parameters()] == before_params
    assert list(model.state_dict()) == list(copy.deepcopy(model).state_dict())
    model.save_pretrained(tmp_path / "after")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "before" / name).read_bytes() == (tmp_path / "after" / name).read_bytes()
    # A deep copy stays patched, on its own modules.
    clone = copy.deepcopy(model)
    q = clone.base_model.model.blocks[0].q
    assert q.forward.__self__ is q
    assert unpatch_peft(model) == sorted(
        f"base_model.model.blocks.{i}.{m}" for i in range(2) for m in ("q", "v")
    )
    assert [(n, type(m)) for n, m in model.named_modules()] == before_modules
    assert "forward" not in model.base_model.model.blocks[0].q.__dict__
    assert unpatch_peft(model) == []


def test_unpatch_restores_peft_forward(monkeypatch):
    model = peft_tiny(LoraConfig(r=4, target_modules=["q"]))
    patch_peft(model)
    unpatch_peft(model)
    counter = LoraLinearCalls(monkeypatch)
    model(ids())
    assert counter.calls == 0


def test_patch_peft_errors(monkeypatch):
    with pytest.raises(ValueError, match="holds no peft LoRA layer"):
        patch_peft(tiny())
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_peft(peft_tiny(LoraConfig(r=4, target_modules=["q"])), backend="nope")
    for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install peft"):
        patch_peft(tiny())


def test_lora_kernels_exports():
    for module, names in (
        (adapter_format, ("save_adapter", "load_adapter")),
        (peft_patch, ("patch_peft", "unpatch_peft", "PatchReport")),
    ):
        for name in names:
            assert name in lora_kernels.__all__
            assert getattr(lora_kernels, name) is getattr(module, name)


def test_load_adapter_result_is_lora_linear(tmp_path):
    path = _write(tmp_path)
    model = load_adapter(tiny(), path)
    assert isinstance(model.blocks[0].q, LoRALinear)
    assert isinstance(model.blocks[0].v, nn.Linear) and not isinstance(
        model.blocks[0].v, LoRALinear
    )
