"""Tiny transformers models built from configs (no hub access) for the interop tests."""

from __future__ import annotations

import copy
import os

# Never reach the hub: every model here is built from a config or a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lora_kernels  # noqa: E402

VOCAB = 100
LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
BERT_TARGETS = ["query", "value", "dense"]


def tiny_llama_config(num_layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.0,
    )


def tiny_llama(seed: int = 0, num_layers: int = 2):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(num_layers)).float()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        # Model dropout off: only the LoRA dropout should draw from the generator.
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config).float()


def llama_batch(seed: int = 1, batch: int = 2, seq: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return {"input_ids": ids, "labels": ids}


def bert_batch(seed: int = 1, batch: int = 3, seq: int = 10) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 3, (batch,), generator=g),
    }


def randomize_peft_lora(peft_model: nn.Module, seed: int = 5, std: float = 0.2) -> None:
    """Non-zero lora_A and lora_B everywhere (peft's init has B = 0: no effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def peft_lora_params(peft_model: nn.Module) -> dict[str, nn.Parameter]:
    """{"<module path>.lora_A": param, ...} keyed as `lora_kernels.lora_state_dict` is."""
    out = {}
    for name, p in peft_model.named_parameters():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}.default.weight"
            if name.endswith(tag):
                path = name[: -len(tag)].removeprefix("base_model.model.")
                out[f"{path}.{part}"] = p
    return out


def apply_lora_like_peft(base: nn.Module, peft_model: nn.Module, config) -> nn.Module:
    """A deep copy of `base` with `apply_lora` adapters holding the peft model's weights."""
    model = copy.deepcopy(base)
    lora_kernels.apply_lora(
        model,
        rank=config.r,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        use_rslora=config.use_rslora,
    )
    source = peft_lora_params(peft_model)
    lora_kernels.load_lora_state_dict(model, {k: v.detach() for k, v in source.items()})
    return model


def lora_grads_by_path(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA gradients of a peft or lora_kernels model, keyed "<path>.lora_A"/"lora_B"."""
    if any(".lora_A.default." in n for n, _ in model.named_parameters()):
        return {k: p.grad for k, p in peft_lora_params(model).items()}
    return {
        name: p.grad
        for name, p in model.named_parameters()
        if name.endswith(".lora_A") or name.endswith(".lora_B")
    }
