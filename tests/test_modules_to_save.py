"""modules_to_save: trainable full copies of whole modules (a classification head), as
peft's ModulesToSaveWrapper, in apply_lora, the model helpers and the adapter format
both ways with peft, on tiny transformers sequence-classification models."""

from __future__ import annotations

import copy
import json
import pickle
import warnings

import pytest
import torch
from helpers import FP32_TOL, rel_error
from tiny_models import BERT_TARGETS, bert_batch, tiny_bert, tiny_llama_config
from torch import nn

from lora_kernels import (
    ModuleToSave,
    apply_lora,
    load_adapter,
    load_lora_state_dict,
    lora_disabled,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_lora,
    remove_lora,
    save_adapter,
    set_lora_enabled,
)

pytest.importorskip("transformers", reason="transformers is not installed (a dev dependency)")
peft = pytest.importorskip("peft", reason="peft is not installed (an optional dependency)")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors not installed")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

LLAMA_SEQ_TARGETS = ["q_proj", "v_proj", "down_proj"]


def tiny_llama_seq_cls(seed: int = 0):
    """LlamaForSequenceClassification with 3 labels; its head is named "score"."""
    from transformers import LlamaForSequenceClassification

    config = tiny_llama_config()
    config.num_labels = 3
    config.pad_token_id = 0
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).float().eval()


# (model factory, head name, LoRA targets, batch without labels)
MODELS = {
    "bert": (lambda: tiny_bert().eval(), "classifier", BERT_TARGETS),
    "llama": (tiny_llama_seq_cls, "score", LLAMA_SEQ_TARGETS),
}


def batch(seed: int = 1) -> dict:
    inputs = bert_batch(seed)
    # Token 0 is Llama's pad token: keep it out so every sequence ends at its last token.
    inputs["input_ids"] = inputs["input_ids"].clamp_min(1)
    del inputs["labels"]
    return inputs


def perturb_trainable(model: nn.Module, seed: int = 5, std: float = 0.2) -> None:
    """Add noise to every trainable tensor: LoRA B (zero at init) and the head copy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def logits(model: nn.Module, seed: int = 1) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(seed)).logits


def peft_head_copy(peft_model, head: str) -> nn.Module:
    return peft_model.get_submodule(f"base_model.model.{head}").modules_to_save["default"]


# ----------------------------------------------------------------------------------------
# Adapters both ways with peft
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list(MODELS))
def test_peft_seq_cls_adapter_loads_with_peft_logits_and_trainable_head(tmp_path, arch):
    make, head, targets = MODELS[arch]
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=targets)
    theirs = get_peft_model(make(), config)
    perturb_trainable(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path)

    ours = load_adapter(make(), tmp_path)
    wrapper = ours.get_submodule(head)
    assert isinstance(wrapper, ModuleToSave)
    for key, value in peft_head_copy(theirs, head).state_dict().items():
        assert torch.equal(wrapper.trainable_copy.state_dict()[key], value), key
    assert rel_error(logits(ours), logits(theirs)) <= FP32_TOL
    # The loaded head is not the base model's: the comparison above could not pass without it.
    assert rel_error(logits(make()), logits(theirs)) > 1e-2
    assert all(p.requires_grad for p in wrapper.trainable_copy.parameters())
    assert not any(p.requires_grad for p in wrapper.original_module.parameters())


@pytest.mark.parametrize("task_type", ["SEQ_CLS", None], ids=["SEQ_CLS", "no-task-type"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_our_modules_to_save_adapter_loads_in_peft_with_same_logits(tmp_path, arch, task_type):
    make, head, targets = MODELS[arch]
    ours = apply_lora(make(), rank=4, alpha=8, target_modules=targets, modules_to_save=[head])
    perturb_trainable(ours)
    save_adapter(ours, tmp_path, task_type=task_type)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [head]
    saved = safetensors_torch.load_file(str(tmp_path / "adapter_model.safetensors"))
    head_keys = sorted(k for k in saved if k.startswith(f"base_model.model.{head}."))
    expected = sorted(f"base_model.model.{head}.{k}" for k in ours.get_submodule(head).state_dict())
    expected = [k.replace(".trainable_copy.", ".") for k in expected if ".trainable_copy." in k]
    assert head_keys == expected

    with warnings.catch_warnings():
        # peft warns (a UserWarning) about adapter keys it misses or cannot place.
        warnings.simplefilter("error", UserWarning)
        theirs = PeftModel.from_pretrained(make(), tmp_path).eval()
    wrapper = ours.get_submodule(head)
    for key, value in peft_head_copy(theirs, head).state_dict().items():
        assert torch.equal(wrapper.trainable_copy.state_dict()[key], value), key
    assert rel_error(logits(theirs), logits(ours)) <= FP32_TOL
    assert rel_error(logits(make()), logits(ours)) > 1e-2


def test_save_and_load_adapter_round_trip_keeps_the_head(tmp_path):
    ours = apply_lora(
        tiny_bert().eval(),
        rank=4,
        alpha=8,
        target_modules=BERT_TARGETS,
        modules_to_save=["classifier"],
    )
    perturb_trainable(ours)
    save_adapter(ours, tmp_path, task_type="SEQ_CLS")
    loaded = load_adapter(tiny_bert().eval(), tmp_path)
    expected = lora_state_dict(ours)
    got = lora_state_dict(loaded)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert torch.equal(logits(loaded), logits(ours))


def test_training_updates_the_head_as_peft_does():
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=BERT_TARGETS)
    theirs = get_peft_model(tiny_bert(), config)
    perturb_trainable(theirs)
    ours = apply_lora(
        tiny_bert(), rank=4, alpha=8, target_modules=BERT_TARGETS, modules_to_save=["classifier"]
    )
    load_lora_state_dict(ours, _our_keys(theirs))
    wrapper = ours.classifier
    before = {k: v.clone() for k, v in wrapper.state_dict().items()}

    inputs = bert_batch(seed=3)
    for model in (ours, theirs):
        model.train()
        model(**inputs).loss.backward()
    peft_grads = {n: p.grad for n, p in peft_head_copy(theirs, "classifier").named_parameters()}
    for name, p in wrapper.trainable_copy.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert rel_error(p.grad, peft_grads[name]) <= FP32_TOL, name
    assert all(p.grad is None for p in wrapper.original_module.parameters())

    torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5).step()
    for key, value in wrapper.state_dict().items():
        changed = not torch.equal(value, before[key])
        assert changed == key.startswith("trainable_copy."), key


def _our_keys(peft_model) -> dict[str, torch.Tensor]:
    """A peft SEQ_CLS model's LoRA and head tensors under lora_state_dict's keys."""
    out = {}
    for name, t in peft_model.state_dict().items():
        name = name.removeprefix("base_model.model.")
        if ".lora_A.default." in name or ".lora_B.default." in name:
            out[name.replace(".default.weight", "")] = t
        elif ".modules_to_save.default." in name:
            out[name.replace(".modules_to_save.default.", ".trainable_copy.")] = t
    return out


# ----------------------------------------------------------------------------------------
# apply_lora and the model helpers
# ----------------------------------------------------------------------------------------


def test_apply_lora_gives_no_adapter_inside_modules_to_save():
    model = apply_lora(tiny_bert(), rank=2, alpha=4, modules_to_save=["classifier"])
    adapted = {name for name, _ in lora_layers(model)}
    linear = {n for n, m in tiny_bert().named_modules() if isinstance(m, nn.Linear)}
    assert adapted == linear - {"classifier"}
    assert isinstance(model.classifier, ModuleToSave)
    assert type(model.classifier.trainable_copy) is nn.Linear


def test_apply_lora_explicit_target_in_modules_to_save_is_refused():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"\['classifier'\] skipped: in modules_to_save"):
        apply_lora(
            model, rank=2, alpha=4, target_modules=["classifier"], modules_to_save=["classifier"]
        )
    assert type(model.classifier) is nn.Linear


def test_module_to_save_reads_attributes_from_the_module_that_runs():
    model = apply_lora(
        tiny_bert(), rank=2, alpha=4, target_modules=["query"], modules_to_save=["classifier"]
    )
    head = model.classifier
    assert head.out_features == 3
    assert head.weight is head.trainable_copy.weight
    head.enabled = False
    assert head.weight is head.original_module.weight


def test_lora_disabled_runs_the_original_head_and_the_base_model():
    base = tiny_bert().eval()
    model = apply_lora(
        copy.deepcopy(base),
        rank=2,
        alpha=4,
        target_modules=BERT_TARGETS,
        modules_to_save=["classifier"],
    )
    perturb_trainable(model)
    adapted = logits(model)
    with lora_disabled(model):
        assert torch.equal(logits(model), logits(base))
    assert torch.equal(logits(model), adapted)
    set_lora_enabled(model, False)
    assert model.classifier.enabled is False
    assert torch.equal(logits(model), logits(base))
    set_lora_enabled(model, True)
    assert torch.equal(logits(model), adapted)


def test_merge_lora_keeps_the_trained_head_and_remove_lora_the_original():
    base = tiny_bert().eval()
    model = apply_lora(
        copy.deepcopy(base),
        rank=2,
        alpha=4,
        target_modules=BERT_TARGETS,
        modules_to_save=["classifier"],
    )
    perturb_trainable(model)
    adapted = logits(model)
    trained, original = model.classifier.trainable_copy, model.classifier.original_module

    merged = merge_lora(copy.deepcopy(model))
    assert type(merged.classifier) is nn.Linear
    assert torch.equal(merged.classifier.weight, trained.weight)
    assert all(p.requires_grad for p in merged.classifier.parameters())
    assert rel_error(logits(merged), adapted) <= FP32_TOL

    remove_lora(model)
    assert model.classifier is original
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(logits(model), logits(base))


def test_lora_state_dict_holds_the_head_copy_and_loads_back():
    model = apply_lora(
        tiny_bert(), rank=2, alpha=4, target_modules=["query"], modules_to_save=["classifier"]
    )
    perturb_trainable(model)
    state = lora_state_dict(model)
    assert {k for k in state if "classifier" in k} == {
        "classifier.trainable_copy.weight",
        "classifier.trainable_copy.bias",
    }
    other = apply_lora(
        tiny_bert(seed=1), rank=2, alpha=4, target_modules=["query"], modules_to_save=["classifier"]
    )
    load_lora_state_dict(other, state)
    for key, value in lora_state_dict(other).items():
        assert torch.equal(value, state[key]), key


def test_mark_only_lora_as_trainable_and_a_second_apply_lora_keep_the_head_trainable():
    model = apply_lora(
        tiny_bert(), rank=2, alpha=4, target_modules=["query"], modules_to_save=["classifier"]
    )
    for p in model.parameters():
        p.requires_grad_(True)
    mark_only_lora_as_trainable(model)
    # A second call adapts more layers, never what lies in the head, and may name it again.
    apply_lora(model, rank=2, alpha=4, modules_to_save=["classifier"])
    assert not any(n.startswith("classifier.") for n, _ in lora_layers(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n in lora_state_dict(model)}
    assert trainable == expected
    assert {"classifier.trainable_copy.weight", "classifier.trainable_copy.bias"} <= trainable


def test_model_with_a_head_copy_pickles_and_deep_copies():
    model = apply_lora(
        tiny_bert().eval(),
        rank=2,
        alpha=4,
        target_modules=["query"],
        modules_to_save=["classifier"],
    )
    perturb_trainable(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(clone.classifier, ModuleToSave)
        assert torch.equal(logits(clone), logits(model))


def test_fullgraph_compile_runs_the_head_copy():
    model = nn.Sequential(nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 3))
    apply_lora(model, rank=2, alpha=4, target_modules=["0"], modules_to_save=["2"])
    perturb_trainable(model)
    x = torch.randn(5, 9, generator=torch.Generator().manual_seed(2))
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    assert rel_error(compiled, eager) <= FP32_TOL
    compiled.square().sum().backward()
    assert model[2].trainable_copy.weight.grad.abs().sum() > 0
    assert model[2].original_module.weight.grad is None
    with lora_disabled(model):
        assert not torch.equal(model(x), eager)


# ----------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------


def _unchanged(model: nn.Module, before: dict) -> bool:
    state = model.state_dict()
    return state.keys() == before.keys() and all(
        torch.equal(state[k], v) for k, v in before.items()
    )


@pytest.mark.parametrize(
    "modules_to_save, error, message",
    [
        (["classifier", "head"], ValueError, r"entries \['head'\] match no module.*'classifier'"),
        ("classifier", TypeError, r"modules_to_save must be None or a list of module names"),
        ([""], TypeError, r"modules_to_save entries must be non-empty module names"),
        (["layer"], TypeError, r"matches 'bert.encoder.layer', a ModuleList"),
        (
            ["output", "dense"],
            ValueError,
            r"'bert.encoder.layer.0.attention.output.dense', which lies inside",
        ),
        (
            ["query"],
            ValueError,
            r"matches 'bert.encoder.layer.0.attention.self.query', which is or holds a LoRALinear",
        ),
    ],
    ids=["no-match", "bare-string", "empty-name", "container", "nested", "lora-layer"],
)
def test_apply_lora_rejects_bad_modules_to_save(modules_to_save, error, message):
    model = apply_lora(tiny_bert(), rank=2, alpha=4, target_modules=["query"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=message):
        apply_lora(
            model, rank=2, alpha=4, target_modules=["value"], modules_to_save=modules_to_save
        )
    assert _unchanged(model, before)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(isinstance(m, ModuleToSave) for m in model.modules())


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)
        self.alias = self.head
        self.xhead = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.body(x)) + self.xhead(self.body(x))


def test_apply_lora_rejects_a_module_to_save_that_holds_a_copy():
    model = apply_lora(
        tiny_bert(), rank=2, alpha=4, target_modules=["query"], modules_to_save=["pooler.dense"]
    )
    with pytest.raises(ValueError, match=r"matches 'bert.pooler', which holds a ModuleToSave"):
        apply_lora(model, rank=2, alpha=4, target_modules=["value"], modules_to_save=["pooler"])
    assert type(model.bert.pooler.dense) is ModuleToSave


def test_apply_lora_rejects_a_module_to_save_registered_under_two_names():
    with pytest.raises(
        ValueError, match=r"matches 'head', which is also registered as \['head', 'alias'\]"
    ):
        apply_lora(Shared(), rank=2, alpha=4, target_modules=["body"], modules_to_save=["head"])


def test_save_adapter_seq_cls_without_a_head_copy_is_refused(tmp_path):
    model = apply_lora(tiny_bert(), rank=2, alpha=4, target_modules=BERT_TARGETS)
    with pytest.raises(
        ValueError, match=r"task_type='SEQ_CLS' .* trained copies of \['classifier'\]"
    ):
        save_adapter(model, tmp_path, task_type="SEQ_CLS")
    assert not (tmp_path / "adapter_model.safetensors").exists()
    save_adapter(model, tmp_path, task_type="CAUSAL_LM")  # no head for peft to expect


def test_save_adapter_refuses_modules_to_save_that_peft_would_match_more_widely(tmp_path):
    model = Shared()
    del model.alias
    # "head" picks out "head" here, but peft matches every name ending with it: "xhead" too.
    apply_lora(model, rank=2, alpha=4, target_modules=["body"])
    model.head = ModuleToSave(model.head)
    with pytest.raises(ValueError, match=r"ends with one of \['head'\].*copies of \['xhead'\]"):
        save_adapter(model, tmp_path)


def test_load_adapter_refuses_a_head_of_another_shape(tmp_path):
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=BERT_TARGETS)
    get_peft_model(tiny_bert(), config).save_pretrained(tmp_path)
    model = tiny_bert()
    model.classifier = nn.Linear(32, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError,
        match=r"'base_model.model.classifier.weight' has shape \[3, 32\], but "
        r"classifier.weight of the model has shape \[2, 32\]",
    ):
        load_adapter(model, tmp_path)
    assert _unchanged(model, before)
    assert not list(lora_layers(model))


def test_load_adapter_refuses_lora_weights_inside_a_module_to_save(tmp_path):
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query"])
    get_peft_model(tiny_bert(), config).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    weights = safetensors_torch.load_file(str(path))
    weights["base_model.model.classifier.lora_A.weight"] = torch.randn(4, 32)
    weights["base_model.model.classifier.lora_B.weight"] = torch.randn(3, 4)
    safetensors_torch.save_file(weights, str(path))
    with pytest.raises(
        ValueError, match=r"LoRA weights for 'classifier', which is \(or lies in\) a module to save"
    ):
        load_adapter(tiny_bert(), tmp_path)


def test_load_adapter_refuses_a_model_that_already_has_the_head_copy(tmp_path):
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query"])
    get_peft_model(tiny_bert(), config).save_pretrained(tmp_path)
    model = tiny_bert()
    model.classifier = ModuleToSave(model.classifier)
    with pytest.raises(ValueError, match=r"'classifier' is already a ModuleToSave"):
        load_adapter(model, tmp_path)


@pytest.mark.parametrize(
    "task_type, head",
    [("TOKEN_CLS", "classifier"), ("QUESTION_ANS", "qa_outputs")],
    ids=["TOKEN_CLS", "QUESTION_ANS"],
)
def test_peft_task_heads_load_both_ways(tmp_path, task_type, head):
    from transformers import BertForQuestionAnswering, BertForTokenClassification

    cls = BertForTokenClassification if task_type == "TOKEN_CLS" else BertForQuestionAnswering
    config = tiny_bert().config
    # A question-answering head gives a start and an end logit per token.
    config.num_labels = 3 if task_type == "TOKEN_CLS" else 2

    def make():
        torch.manual_seed(0)
        return cls(config).eval()

    def output(model):
        with torch.no_grad():
            out = model(**batch())
        return out.logits if task_type == "TOKEN_CLS" else out.start_logits

    lora = LoraConfig(task_type=task_type, r=4, lora_alpha=8, target_modules=BERT_TARGETS)
    theirs = get_peft_model(make(), lora)
    perturb_trainable(theirs)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = load_adapter(make(), tmp_path / "peft")
    assert isinstance(ours.get_submodule(head), ModuleToSave)
    assert rel_error(output(ours), output(theirs)) <= FP32_TOL

    # Back: our save with the task type loads in peft with the same head.
    perturb_trainable(ours, seed=6)
    save_adapter(ours, tmp_path / "ours", task_type=task_type)
    again = PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    assert rel_error(output(again), output(ours)) <= FP32_TOL
    assert rel_error(output(again), output(theirs)) > 1e-2
    # And without a head copy, that task type is refused.
    with pytest.raises(ValueError, match=rf"task_type='{task_type}' .*copies of \['{head}'\]"):
        save_adapter(apply_lora(make(), rank=2, alpha=4), tmp_path / "bad", task_type=task_type)
