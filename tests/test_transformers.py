"""transformers models (tiny, built from configs, loaded with from_pretrained from a local
directory the test wrote): peft, patch_peft and apply_lora agree; adapters and merged
models survive save/load; torch.compile(fullgraph=True) traces and trains."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")
pytest.importorskip("peft", reason="peft is not installed (an optional dependency)")

from helpers import FP32_TOL, rel_error  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from tiny_models import (  # noqa: E402
    BERT_TARGETS,
    LLAMA_TARGETS,
    apply_lora_like_peft,
    bert_batch,
    llama_batch,
    lora_grads_by_path,
    randomize_peft_lora,
    tiny_bert,
    tiny_llama,
)
from transformers import BertForSequenceClassification, LlamaForCausalLM  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels import (  # noqa: E402
    LoRALinear,
    load_adapter,
    lora_layers,
    merge_lora,
    patch_peft,
    save_adapter,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_llama(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    tiny_bert(seed=0).save_pretrained(path)
    return path


def load_llama(path):
    return LlamaForCausalLM.from_pretrained(path).float().train()


def three_models(base_loader, path, targets, dropout, task_type=None):
    """peft LoRA, the same peft model patched, and apply_lora, all with the same weights."""
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, task_type=task_type
    )
    peft_model = get_peft_model(base_loader(path), config)
    randomize_peft_lora(peft_model)
    patched = copy.deepcopy(peft_model)
    report = patch_peft(patched)
    assert report.not_patched == {}
    ours = apply_lora_like_peft(base_loader(path), peft_model, config)
    assert len(report.patched) == len(list(lora_layers(ours)))
    return peft_model.train(), patched.train(), ours.train()


def loss_and_grads(model, batch, seed=3):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), lora_grads_by_path(model)


def test_llama_peft_patched_and_apply_lora_same_loss_and_grads(llama_dir):
    models = three_models(load_llama, llama_dir, LLAMA_TARGETS, dropout=0.0)
    batch = llama_batch()
    (loss_p, grads_p), (loss_x, grads_x), (loss_o, grads_o) = (
        loss_and_grads(m, batch) for m in models
    )
    assert len(grads_o) == 2 * 4 * 2 and sorted(grads_p) == sorted(grads_o) == sorted(grads_x)
    assert rel_error(loss_o, loss_p) <= FP32_TOL
    assert torch.equal(loss_x, loss_o)
    for name, grad in grads_o.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert rel_error(grad, grads_p[name]) <= FP32_TOL, name
        assert torch.equal(grads_x[name], grad), name
    # Frozen base: no gradient anywhere else.
    for model in models:
        for name, p in model.named_parameters():
            if "lora_" not in name:
                assert not p.requires_grad and p.grad is None, name


def test_llama_same_loss_trajectory_over_20_adamw_steps(llama_dir):
    models = three_models(load_llama, llama_dir, LLAMA_TARGETS, dropout=0.0)
    trajectories = []
    for model in models:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        losses = []
        for _ in range(20):
            loss = model(**llama_batch(seed=0)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        trajectories.append(losses)
    peft_losses, patched_losses, our_losses = trajectories
    assert our_losses[-1] < our_losses[0] - 0.1  # it trains
    assert patched_losses == our_losses
    for step, (a, b) in enumerate(zip(our_losses, peft_losses, strict=True)):
        assert abs(a - b) <= 1e-4 * abs(b), f"step {step}: {a} vs peft {b}"


def test_llama_dropout_patched_equals_apply_lora_bit_for_bit(llama_dir):
    peft_model, patched, ours = three_models(load_llama, llama_dir, LLAMA_TARGETS, dropout=0.1)
    optimizers = [
        torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        for m in (patched, ours)
    ]
    for step in range(3):
        batch = llama_batch(seed=step)
        (loss_x, grads_x), (loss_o, grads_o) = (
            loss_and_grads(m, batch, seed=100 + step) for m in (patched, ours)
        )
        assert torch.equal(loss_x, loss_o), step
        for name in grads_o:
            assert torch.equal(grads_x[name], grads_o[name]), (step, name)
        for optimizer in optimizers:
            optimizer.step()
    # The dropout is real: peft (its own mask) and another seed give other losses.
    loss_peft, _ = loss_and_grads(peft_model, llama_batch(seed=0), seed=100)
    loss_other_seed, _ = loss_and_grads(ours, llama_batch(seed=0), seed=101)
    loss_same_seed, _ = loss_and_grads(ours, llama_batch(seed=0), seed=100)
    assert not torch.equal(loss_other_seed, loss_same_seed)
    assert not torch.equal(loss_peft, loss_same_seed)


def load_bert(path):
    return BertForSequenceClassification.from_pretrained(path).float().train()


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["p0", "p0.1"])
def test_bert_classifier_peft_patched_and_apply_lora_agree(bert_dir, dropout):
    models = three_models(load_bert, bert_dir, BERT_TARGETS, dropout=dropout)
    batch = bert_batch()
    (loss_p, grads_p), (loss_x, grads_x), (loss_o, grads_o) = (
        loss_and_grads(m, batch) for m in models
    )
    # query, value, attention.output.dense, intermediate.dense, output.dense per layer,
    # and the pooler's dense.
    assert len(grads_o) == 2 * (2 * 5 + 1)
    assert torch.equal(loss_x, loss_o)
    for name, grad in grads_o.items():
        assert torch.equal(grads_x[name], grad), name
    if dropout == 0.0:
        assert rel_error(loss_o, loss_p) <= FP32_TOL
        for name, grad in grads_o.items():
            assert rel_error(grad, grads_p[name]) <= FP32_TOL, name


def test_merge_lora_then_save_pretrained_and_from_pretrained(llama_dir, tmp_path):
    _, _, ours = three_models(load_llama, llama_dir, LLAMA_TARGETS, dropout=0.1)
    ours.eval()
    batch = llama_batch()
    with torch.no_grad():
        before = ours(input_ids=batch["input_ids"]).logits
        merge_lora(ours)
        assert not any(isinstance(m, LoRALinear) for m in ours.modules())
        merged_out = ours(input_ids=batch["input_ids"]).logits
    ours.save_pretrained(tmp_path)
    assert sorted(load_llama(llama_dir).state_dict()) == sorted(ours.state_dict())
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = reloaded(input_ids=batch["input_ids"]).logits
    assert torch.equal(after, merged_out)
    assert rel_error(after, before) <= FP32_TOL
    assert (
        rel_error(after, load_llama(llama_dir).eval()(input_ids=batch["input_ids"]).logits) > 1e-3
    )


def test_llama_adapter_round_trips_with_peft(llama_dir, tmp_path):
    peft_model, _, ours = three_models(
        load_llama, llama_dir, LLAMA_TARGETS, dropout=0.0, task_type="CAUSAL_LM"
    )
    ids = llama_batch()["input_ids"]
    with torch.no_grad():
        expected = ours.eval()(input_ids=ids).logits

    # Ours -> peft.
    save_adapter(
        ours, tmp_path / "ours", base_model_name_or_path=str(llama_dir), task_type="CAUSAL_LM"
    )
    from_peft = PeftModel.from_pretrained(load_llama(llama_dir), tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel_error(from_peft(input_ids=ids).logits, expected) <= FP32_TOL

    # peft's save_pretrained -> ours.
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(load_llama(llama_dir), tmp_path / "peft").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


# ----------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------


def llama_with_lora(path, dropout):
    model = load_llama(path)
    lora_kernels.apply_lora(model, rank=4, alpha=8, dropout=dropout, target_modules=LLAMA_TARGETS)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.2)
    return model


def compiled_training_matches_eager(model, backend, steps, tol):
    """fullgraph compile (a graph break raises), then `steps` AdamW steps compiled and
    eager from the same start: the same losses within `tol` (relative), and it trains."""
    torch._dynamo.reset()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    losses = {}
    for name, runner, params in (
        ("compiled", compiled, model.parameters()),
        ("eager", eager, eager.parameters()),
    ):
        optimizer = torch.optim.AdamW([p for p in params if p.requires_grad], lr=2e-2)
        losses[name] = []
        for step in range(steps):
            torch.manual_seed(50 + step)
            loss = runner(**llama_batch(seed=0)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    for step, (a, b) in enumerate(zip(losses["compiled"], losses["eager"], strict=True)):
        assert abs(a - b) <= tol * abs(b), f"step {step}: compiled {a} vs eager {b}"
    assert losses["compiled"][-1] < losses["compiled"][0]
    return losses


def test_compile_fullgraph_llama_inductor_trains_like_eager(llama_dir):
    # Inductor draws random numbers (the op's dropout seed too) from its own generator
    # unless fallback_random is set; with it, compiled and eager draw the same seeds.
    import torch._inductor.config as inductor_config

    model = llama_with_lora(llama_dir, dropout=0.1)
    # One compile thread: a worker pool only adds start-up cost on a small CPU machine.
    with inductor_config.patch(fallback_random=True, compile_threads=1):
        compiled_training_matches_eager(model, "inductor", steps=3, tol=1e-5)


def test_compile_fullgraph_patched_peft_model_with_dropout(llama_dir):
    """The whole PeftModel, patched, under fullgraph (aot_eager: eager kernels, so the
    seeds come from the same generator and the losses match bit for bit)."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=LLAMA_TARGETS)
    model = get_peft_model(load_llama(llama_dir), config)
    randomize_peft_lora(model)
    patch_peft(model)
    losses = compiled_training_matches_eager(model, "aot_eager", steps=3, tol=0.0)
    assert len(set(losses["eager"])) == 3


def test_compile_fullgraph_with_gradient_checkpointing(llama_dir):
    """transformers' checkpointing under fullgraph: with use_cache=False and the input
    requires_grad hook removed it traces, the loss equals the eager run without
    checkpointing bit for bit, and the gradients agree to float32 rounding (aot_eager:
    the same seeds, the same masks)."""
    import warnings

    torch._dynamo.reset()
    model = llama_with_lora(llama_dir, dropout=0.1)
    eager = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias
        model.gradient_checkpointing_enable()
    model.disable_input_require_grads()
    model.config.use_cache = False
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for runner, owner in ((compiled, model), (eager, eager)):
        torch.manual_seed(9)
        loss = runner(**llama_batch()).loss
        loss.backward()
        grads = {n: p.grad for n, p in owner.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss, grads), (loss_eager, grads_eager) = results
    assert model.model.layers[0].gradient_checkpointing
    assert torch.equal(loss, loss_eager)
    assert len(grads) == 16
    for name, grad in grads.items():
        # Not bit for bit: traced under checkpointing, transformers' SDPA attention gets an
        # explicit causal mask and repeat_kv'd keys and values instead of is_causal=True
        # with native GQA, so ATen's attention backward (and the sum over the repeated
        # heads) rounds dQ/dK/dV differently, and on some CPUs (AMD EPYC) not to the same
        # bits. Our op is not the source: given bit-identical inputs its backward returns
        # bit-identical gradients. A different dropout mask would miss this by far more.
        assert rel_error(grad, grads_eager[name]) <= FP32_TOL, name
