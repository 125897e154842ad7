"""Model-level helpers on a small MLP and a small transformer built here."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_kernels import (
    LoRALinear,
    apply_lora,
    count_parameters,
    load_lora_state_dict,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    remove_lora,
    set_lora_enabled,
)

D, HEADS, VOCAB, HIDDEN = 16, 2, 50, 32


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D) for _ in range(3))
        self.o_proj = nn.Linear(D, D)

    def forward(self, h):
        B, T, _ = h.shape

        def heads(t):
            return t.view(B, T, HEADS, D // HEADS).transpose(1, 2)

        q, k, v = heads(self.q_proj(h)), heads(self.k_proj(h)), heads(self.v_proj(h))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(a.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = Attention()
        self.mlp = nn.Sequential()
        self.mlp.add_module("up_proj", nn.Linear(D, HIDDEN))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("down_proj", nn.Linear(HIDDEN, D))

    def forward(self, h):
        h = h + self.attn(self.ln1(h))
        return h + self.mlp(self.ln2(h))


class TinyTransformer(nn.Module):
    """A two-block decoder with LLaMA-style module names."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.layers:
            h = block(h)
        return self.lm_head(self.norm(h))


TRANSFORMER_LINEARS = sorted(
    [
        f"layers.{i}.{name}"
        for i in range(2)
        for name in (
            "attn.q_proj",
            "attn.k_proj",
            "attn.v_proj",
            "attn.o_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    + ["lm_head"]
)


def tiny_mlp():
    return nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.GELU(), nn.Linear(24, 5)
    )


def transformer():
    torch.manual_seed(0)
    return TinyTransformer()


def tokens():
    return torch.randint(VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))


def randomize_lora_B(model, seed=2):
    """B is zero at init: give every adapter a non-zero B so that it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.5)


def lora_names(model):
    return sorted(name for name, _ in lora_layers(model))


def trainable_names(model):
    return sorted(name for name, p in model.named_parameters() if p.requires_grad)


def test_apply_lora_all_linear_on_an_mlp_wraps_each_linear_and_freezes_the_rest():
    torch.manual_seed(0)
    model = tiny_mlp()
    x = torch.randn(4, 12)
    expected = model(x)
    total_before = count_parameters(model)[1]

    assert apply_lora(model, rank=4, alpha=8) is model
    assert lora_names(model) == ["0", "2", "4"]
    assert trainable_names(model) == [f"{i}.lora_{ab}" for i in (0, 2, 4) for ab in "AB"]
    assert torch.equal(model(x), expected), "B = 0 at init: the output must not change"
    lora = 4 * (12 + 24) + 4 * (24 + 24) + 4 * (24 + 5)
    assert count_parameters(model) == (lora, total_before + lora)


@pytest.mark.parametrize(
    "target_modules",
    [["q_proj", "v_proj"], r"layers\.\d+\.attn\.[qv]_proj", ("attn.q_proj", "attn.v_proj")],
    ids=["suffix-list", "regex", "dotted-suffix-tuple"],
)
def test_apply_lora_targets_by_suffix_or_regex_on_a_transformer(target_modules):
    model = transformer()
    apply_lora(model, rank=2, alpha=4, target_modules=target_modules)
    assert lora_names(model) == [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qv"]
    assert type(model.layers[0].attn.k_proj) is nn.Linear
    assert trainable_names(model) == [
        f"layers.{i}.attn.{p}_proj.lora_{ab}" for i in range(2) for p in "qv" for ab in "AB"
    ]


def test_a_full_name_entry_matches_only_that_module():
    model = apply_lora(transformer(), 2, 4, target_modules=["layers.1.mlp.up_proj"])
    assert lora_names(model) == ["layers.1.mlp.up_proj"]


@pytest.mark.parametrize(
    "target_modules", [["proj"], "q_proj", ["o"]], ids=["partial-suffix", "regex", "letter"]
)
def test_no_linear_match_raises_listing_the_linear_modules_seen(target_modules):
    model = transformer()
    with pytest.raises(ValueError, match="matches no nn.Linear") as info:
        apply_lora(model, 2, 4, target_modules=target_modules)
    for name in TRANSFORMER_LINEARS:
        assert repr(name) in str(info.value)
    assert lora_names(model) == []


def test_exclude_modules_leaves_the_named_modules_alone():
    model = apply_lora(
        transformer(), 2, 4, target_modules="all-linear", exclude_modules=["lm_head"]
    )
    assert lora_names(model) == TRANSFORMER_LINEARS[:-1]
    model = apply_lora(transformer(), 2, 4, exclude_modules=r".*\.mlp\..*")
    assert lora_names(model) == [n for n in TRANSFORMER_LINEARS if ".mlp." not in n]


@pytest.mark.parametrize(
    "target_modules, named",
    [
        (["attn"], "layers.0.attn"),
        (["ln1"], "layers.0.ln1"),
        (["embed"], "embed"),
        (r"layers\.1\.mlp", "layers.1.mlp"),
    ],
    ids=["Attention", "LayerNorm", "Embedding", "regex-Sequential"],
)
def test_a_target_that_is_not_nn_linear_raises_naming_it(target_modules, named):
    model = transformer()
    with pytest.raises(TypeError, match=f"matches '{named}', a .*only torch.nn.Linear"):
        apply_lora(model, 2, 4, target_modules=target_modules)
    assert lora_names(model) == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"alpha": float("nan")}, ValueError, "alpha"),
        ({"dropout": 1.0}, ValueError, "dropout"),
        ({"init": "svd", "rank": 17}, ValueError, "'layers.0.attn.q_proj' is \\[16, 16\\]"),
        ({"target_modules": 3}, TypeError, "target_modules"),
        ({"target_modules": "("}, ValueError, "target_modules is not a valid regex"),
        ({"exclude_modules": [None]}, TypeError, "exclude_modules entries"),
    ],
    ids=[
        "rank0",
        "alpha-nan",
        "dropout1",
        "svd-rank-too-big",
        "target-int",
        "bad-regex",
        "exclude",
    ],
)
def test_bad_arguments_raise_and_leave_the_model_unchanged(kwargs, error, message):
    model = transformer()
    before = copy.deepcopy(model.state_dict())
    kwargs = {"rank": 2, "alpha": 4, **kwargs}
    with pytest.raises(error, match=message):
        apply_lora(model, **kwargs)
    assert lora_names(model) == []
    assert all(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_apply_lora_to_a_bare_linear_raises():
    with pytest.raises(TypeError, match="wrap a bare nn.Linear with LoRALinear"):
        apply_lora(nn.Linear(4, 4), 2, 4)


def test_training_step_updates_only_the_adapters():
    model = apply_lora(transformer(), 2, 4, target_modules=["q_proj", "v_proj"], dropout=0.1)
    randomize_lora_B(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    logits = model(tokens())
    loss = F.cross_entropy(logits.flatten(0, 1), tokens().flatten())
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert p.grad is None, name
    optimizer.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    model.eval()
    assert F.cross_entropy(model(tokens()).flatten(0, 1), tokens().flatten()) != loss


def test_lora_disabled_gives_the_base_output_and_restores_each_layer_state():
    base = transformer()
    model = apply_lora(copy.deepcopy(base), 2, 4, target_modules=["q_proj", "o_proj", "lm_head"])
    randomize_lora_B(model)
    model.layers[1].attn.q_proj.enabled = False
    lora_out = model(tokens())
    assert not torch.equal(lora_out, base(tokens()))
    with lora_disabled(model) as same:
        assert same is model
        assert torch.equal(model(tokens()), base(tokens()))
    assert [layer.enabled for _, layer in lora_layers(model)] == [True, True, False, True, True]
    assert torch.equal(model(tokens()), lora_out)
    with pytest.raises(KeyError), lora_disabled(model):
        raise KeyError("inside")
    assert torch.equal(model(tokens()), lora_out)


def test_set_lora_enabled_switches_every_adapter():
    base = transformer()
    model = apply_lora(copy.deepcopy(base), 2, 4)
    randomize_lora_B(model)
    set_lora_enabled(model, False)
    assert torch.equal(model(tokens()), base(tokens()))
    set_lora_enabled(model, True)
    assert not torch.equal(model(tokens()), base(tokens()))
    with pytest.raises(TypeError, match="flag must be a bool, got 0"):
        set_lora_enabled(model, 0)


def test_merge_lora_replaces_adapters_by_plain_linears_with_the_same_output():
    model = apply_lora(transformer(), 2, 4, dropout=0.1).eval()
    randomize_lora_B(model)
    model.layers[0].mlp.up_proj.merge()  # a layer merged already is fine
    model.layers[1].mlp.up_proj.enabled = False  # disabled adapters are merged too
    model.layers[1].mlp.up_proj.enabled = True
    with torch.no_grad():
        expected = model(tokens())
    assert merge_lora(model) is model
    assert lora_names(model) == []
    assert all(type(model.get_submodule(n)) is nn.Linear for n in TRANSFORMER_LINEARS)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), expected, rtol=1e-5, atol=1e-5)


def test_merge_lora_refuses_a_non_finite_adapter_and_leaves_the_model_unchanged():
    model = apply_lora(transformer(), 2, 4)
    randomize_lora_B(model)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.layers[1].attn.o_proj.lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        merge_lora(model)
    assert lora_names(model) == TRANSFORMER_LINEARS
    assert not any(layer.merged for _, layer in lora_layers(model))
    for key, value in model.state_dict().items():
        if key != "layers.1.attn.o_proj.lora_B":
            # Earlier layers were merged and unmerged: within one rounding step.
            torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("init", ["kaiming", "svd"])
def test_remove_lora_restores_the_original_model(init):
    base = transformer()
    model = apply_lora(copy.deepcopy(base), 2, 4, init=init)
    randomize_lora_B(model)
    model.layers[0].attn.v_proj.merge()
    assert not torch.allclose(model(tokens()), base(tokens()))
    assert remove_lora(model) is model
    assert lora_names(model) == []
    assert all(type(model.get_submodule(n)) is nn.Linear for n in TRANSFORMER_LINEARS)
    torch.testing.assert_close(model(tokens()), base(tokens()), rtol=1e-5, atol=1e-5)


def test_lora_state_dict_holds_only_the_adapter_keyed_as_in_state_dict():
    model = apply_lora(tiny_mlp(), 2, 4, target_modules=["0", "4"], learnable_scaling=True)
    state = lora_state_dict(model)
    assert sorted(state) == [f"{i}.{k}" for i in (0, 4) for k in ("lora_A", "lora_B", "scaling")]
    full = model.state_dict()
    for key, value in state.items():
        assert torch.equal(value, full[key]) and not value.requires_grad


def test_lora_state_dict_round_trip_reproduces_the_outputs():
    torch.manual_seed(0)
    trained = apply_lora(transformer(), 2, 4, learnable_scaling=True)
    randomize_lora_B(trained)
    with torch.no_grad():
        trained.layers[0].attn.q_proj.scaling.fill_(0.7)
    state = {k: v.clone() for k, v in lora_state_dict(trained).items()}
    torch.manual_seed(1)  # a different random A in the fresh adapters
    fresh = apply_lora(transformer(), 2, 4, learnable_scaling=True)
    assert not torch.equal(fresh(tokens()), trained(tokens()))
    load_lora_state_dict(fresh, state)
    assert torch.equal(fresh(tokens()), trained(tokens()))


def test_load_lora_state_dict_is_strict_and_loads_nothing_on_error():
    model = apply_lora(transformer(), 2, 4, target_modules=["q_proj"])
    good = {k: v.clone() + 1 for k, v in lora_state_dict(model).items()}
    before = {k: v.clone() for k, v in lora_state_dict(model).items()}

    missing = dict(good)
    del missing["layers.1.attn.q_proj.lora_B"]
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.attn.q_proj.lora_B'\]"):
        load_lora_state_dict(model, missing)
    unexpected = {**good, "layers.0.attn.k_proj.lora_A": torch.zeros(2, D)}
    with pytest.raises(ValueError, match=r"unexpected keys \['layers.0.attn.k_proj.lora_A'\]"):
        load_lora_state_dict(model, unexpected)
    wrong_shape = {**good, "layers.1.attn.q_proj.lora_A": torch.zeros(4, D)}
    with pytest.raises(
        ValueError,
        match=r"'layers.1.attn.q_proj.lora_A'\] has shape \[4, 16\].*has shape \[2, 16\]",
    ):
        load_lora_state_dict(model, wrong_shape)
    with pytest.raises(TypeError, match="must be a tensor"):
        load_lora_state_dict(model, {**good, "layers.0.attn.q_proj.lora_B": [[0.0]]})
    for key, value in lora_state_dict(model).items():
        assert torch.equal(value, before[key]), f"{key} changed by a refused load"

    model.layers[0].attn.q_proj.merge()
    with pytest.raises(ValueError, match=r"\['layers.0.attn.q_proj'\] are merged"):
        load_lora_state_dict(model, good)


def test_mark_only_lora_as_trainable_freezes_everything_else():
    model = apply_lora(transformer(), 2, 4, target_modules=["q_proj"], learnable_scaling=True)
    for p in model.parameters():
        p.requires_grad_(True)
    assert mark_only_lora_as_trainable(model) is model
    assert trainable_names(model) == sorted(
        f"layers.{i}.attn.q_proj.{k}" for i in range(2) for k in ("lora_A", "lora_B", "scaling")
    )


def test_a_second_apply_lora_keeps_the_first_adapters_trainable():
    model = apply_lora(transformer(), 2, 4, target_modules=["q_proj"])
    apply_lora(model, 3, 3, target_modules=["down_proj"])
    assert model.layers[0].mlp.down_proj.rank == 3 and model.layers[0].attn.q_proj.rank == 2
    assert len(trainable_names(model)) == 8
    # "all-linear" on a model with adapters wraps only the remaining plain linears.
    apply_lora(model, 2, 4)
    assert lora_names(model) == TRANSFORMER_LINEARS
    assert all(type(layer.original_linear) is nn.Linear for _, layer in lora_layers(model))
    with pytest.raises(ValueError, match="'layers.0.attn.q_proj', which is already a LoRALinear"):
        apply_lora(model, 2, 4, target_modules=["q_proj"])


def test_a_linear_shared_under_two_names_gets_one_adapter_at_both():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU())
    model.append(model[2])  # "2" and "4" are the same module
    x = torch.randn(3, 12)
    expected = model(x)
    apply_lora(model, 2, 4, target_modules=["2"])
    assert isinstance(model[2], LoRALinear) and model[4] is model[2]
    assert count_parameters(model)[0] == 2 * (24 + 24)
    assert torch.equal(model(x), expected)
    remove_lora(model)
    assert type(model[2]) is nn.Linear and model[4] is model[2]
    assert torch.equal(model(x), expected)


def test_multihead_attention_out_proj_is_skipped_by_all_linear_and_refused_by_name():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=HIDDEN, dropout=0.0)
    x = torch.randn(5, 2, D)
    expected = layer(x)
    with pytest.warns(UserWarning, match=r"\['self_attn.out_proj'\] without adapter"):
        apply_lora(layer, 2, 4)
    assert lora_names(layer) == ["linear1", "linear2"]
    assert torch.equal(layer(x), expected)
    with pytest.raises(TypeError, match="'self_attn.out_proj', the out_proj of an"):
        apply_lora(nn.TransformerEncoderLayer(D, HEADS), 2, 4, target_modules=["out_proj"])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_model_with_adapters_survives_deepcopy_and_pickle(how):
    model = apply_lora(transformer(), 2, 4, init="svd", dropout=0.1).eval()
    randomize_lora_B(model)
    clone = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert torch.equal(clone(tokens()), model(tokens()))
    assert lora_names(clone) == TRANSFORMER_LINEARS
    assert trainable_names(clone) == trainable_names(model)


def test_count_parameters_counts_trainable_and_shared_parameters_once():
    model = transformer()
    model.lm_head.weight = model.embed.weight  # tied
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (total, total)
    apply_lora(model, 2, 4, target_modules=["q_proj"])
    lora = 2 * 2 * (D + D)
    assert count_parameters(model) == (lora, total + lora)
