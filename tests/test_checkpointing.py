"""Activation checkpointing around LoRA layers with dropout: the recomputed forward draws
the same seed (torch.utils.checkpoint restores the RNG state), so it rebuilds the same
mask and the gradients equal those of the run without checkpointing, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lora_kernels.layer as layer_module
from lora_kernels import apply_lora, lora_layers

P = 0.2


class Block(nn.Module):
    def __init__(self, width=24, hidden=40):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, h):
        return h + self.down(nn.functional.gelu(self.up(self.norm(h))))


class Stack(nn.Module):
    def __init__(self, checkpointing=None, preserve_rng_state=True):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.checkpointing = checkpointing  # None, or use_reentrant (True / False)
        self.preserve_rng_state = preserve_rng_state

    def forward(self, h):
        for block in self.blocks:
            if self.checkpointing is None:
                h = block(h)
            else:
                h = checkpoint(
                    block,
                    h,
                    use_reentrant=self.checkpointing,
                    preserve_rng_state=self.preserve_rng_state,
                )
        return h


def stack_with_lora():
    torch.manual_seed(0)
    model = Stack()
    apply_lora(model, rank=4, alpha=8, dropout=P, target_modules=["up", "down"])
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.3)
    return model


def run(model, x, seed=7):
    """Loss, the grads of x and of every LoRA parameter, and the number of op calls."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    loss = model(x).square().mean()
    loss.backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    return loss.detach(), grads


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the lora_linear calls made by LoRALinear.forward."""
    calls = []
    original = layer_module.lora_linear

    def counting(*args, **kwargs):
        calls.append(kwargs.get("dropout_p"))
        return original(*args, **kwargs)

    monkeypatch.setattr(layer_module, "lora_linear", counting)
    return calls


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpointed_blocks_recompute_the_same_mask(use_reentrant, op_calls):
    plain = stack_with_lora()
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = use_reentrant
    x = torch.randn(2, 9, 24)
    loss, grads = run(plain, x)
    assert len(op_calls) == 6
    loss_ckpt, grads_ckpt = run(checkpointed, x)
    # Six forward calls, then six recomputations in backward.
    assert len(op_calls) == 6 + 12 and set(op_calls) == {P}
    assert torch.equal(loss_ckpt, loss)
    assert sorted(grads_ckpt) == sorted(grads) and len(grads) == 1 + 12
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.equal(grads_ckpt[name], grad), name


def test_checkpoint_without_rng_preservation_gets_another_mask():
    """The control: with preserve_rng_state=False the recomputation draws new seeds, so
    the gradients differ; the equality above is the mask's doing."""
    plain = stack_with_lora()
    unpreserved = copy.deepcopy(plain)
    unpreserved.checkpointing = False
    unpreserved.preserve_rng_state = False
    x = torch.randn(2, 9, 24)
    loss, grads = run(plain, x)
    loss_ckpt, grads_ckpt = run(unpreserved, x)
    assert torch.equal(loss_ckpt, loss)
    assert not torch.equal(grads_ckpt["blocks.0.up.lora_A"], grads["blocks.0.up.lora_A"])


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_transformers_gradient_checkpointing_enable(use_reentrant):
    pytest.importorskip("transformers", reason="transformers is not installed")
    import warnings

    from tiny_models import LLAMA_TARGETS, llama_batch, tiny_llama

    torch.manual_seed(0)
    plain = tiny_llama(seed=0).train()
    apply_lora(plain, rank=4, alpha=8, dropout=0.1, target_modules=LLAMA_TARGETS)
    with torch.no_grad():
        for _, layer in lora_layers(plain):
            layer.lora_B.normal_(std=0.2)
    checkpointed = copy.deepcopy(plain)
    with warnings.catch_warnings():
        # Deprecated alias of activation_checkpointing_enable in transformers 5.
        warnings.simplefilter("ignore", FutureWarning)
        checkpointed.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
        )
    assert checkpointed.model.layers[0].gradient_checkpointing
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(5)
        loss = model(**llama_batch()).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss_ckpt, loss)
    assert len(grads) == 2 * 4 * 2 and sorted(grads) == sorted(grads_ckpt)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert torch.equal(grads_ckpt[name], grad), name


def test_checkpointing_keeps_less_than_the_plain_run():
    """What checkpointing is for: inside a checkpointed block nothing is kept."""
    from lora_kernels.memory import saved_activations

    plain = stack_with_lora()
    checkpointed = copy.deepcopy(plain)
    checkpointed.checkpointing = False
    x = torch.randn(4, 32, 24, requires_grad=True)
    sizes = {}
    for name, model in (("plain", plain), ("checkpointed", checkpointed)):
        _, saved = saved_activations(lambda m=model: m(x), exclude=model.parameters())
        sizes[name] = saved.bytes
    assert sizes["checkpointed"] < sizes["plain"] / 2, sizes
