"""peft interop: adapters in peft's on-disk format, and peft models run by the fused op.

Two independent pieces:

- `save_adapter` / `load_adapter` write and read a directory in peft's LoRA format
  (`adapter_config.json` + `adapter_model.safetensors`), so that a model adapted with
  `apply_lora` and a `peft.PeftModel` can exchange adapters both ways. Keys are
  peft's: `base_model.model.<module path>.lora_A.weight` [R, K] and
  `base_model.model.<module path>.lora_B.weight` [N, R], where <module path> is the
  module's name in the base model (`model.named_modules()` of the model without
  adapters, e.g. "model.layers.0.self_attn.q_proj").
- `patch_peft` / `unpatch_peft` make an existing peft model run every LoRA linear
  layer it can serve through `lora_linear` (the fused op), in place, without touching
  its module tree, parameters or `save_pretrained`.

peft (and safetensors, for the file format) are optional: they are imported inside the
functions that need them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import numbers
import os
import pathlib
import re
import types

import torch
from torch import nn

from .layer import LoRALinear
from .model import mark_only_lora_as_trainable
from .ops import lora_linear
from .validation import check_alpha, check_backend, check_dropout_p, check_rank

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# Older peft versions (and safe_serialization=False) write a torch pickle instead.
WEIGHTS_NAME_BIN = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)
# init_lora_weights values that leave the base weights as they are: an adapter saved
# with them applies to the unmodified base model. PiSSA, OLoRA, CorDA, LoftQ and
# LoRA-GA rewrite the base weights; MiCA is a variant with a frozen B.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
# Entries of adapter_config.json that describe a plain LoRA adapter whatever their
# value (each checked below where it matters) or that carry no meaning for loading.
_KNOWN_ENTRIES = {
    "peft_type",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "bias",
    "fan_in_fan_out",
    "init_lora_weights",
    "use_dora",
    "lora_bias",
    "modules_to_save",
    # Settings of inits and variants that only act when those are chosen (checked
    # through init_lora_weights / use_qalora).
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "runtime_config",
    "ensure_weight_tying",
}
# Why an entry that is set (truthy) cannot be served, for the entries peft 0.21 knows.
_UNSUPPORTED_ENTRIES = {
    "use_dora": "DoRA (a magnitude vector and a normalised weight) is not plain LoRA",
    "lora_bias": "lora_bias adds a trainable bias to lora_B; LoRALinear has none",
    "modules_to_save": "modules_to_save trains full copies of whole modules beside the adapter",
    "fan_in_fan_out": "fan_in_fan_out targets transposed (Conv1D, GPT-2 style) weights",
    "layer_replication": "layer_replication changes the model's layer structure",
    "trainable_token_indices": "trainable_token_indices trains rows of an embedding",
    "target_parameters": "target_parameters adapts bare nn.Parameters (MoE experts)",
    "megatron_config": "megatron_config targets Megatron's parallel linear layers",
    "use_qalora": "QA-LoRA pools the input of quantized layers",
    "alora_invocation_tokens": "aLoRA is a LoRA variant",
    "arrow_config": "Arrow is a LoRA variant (routing between adapters)",
    "use_bdlora": "BD-LoRA is a LoRA variant",
    "velora_config": "VeLoRA is a LoRA variant",
    "monteclora_config": "MonteCLoRA is a LoRA variant",
    "kasa_config": "KaSA is a LoRA variant",
    "mica": "MiCA is a LoRA variant",
}


def _require_safetensors():
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            "reading and writing adapter_model.safetensors needs the safetensors package "
            "(pip install safetensors)"
        ) from error
    return safetensors.torch


def _require_peft():
    try:
        from peft.tuners.lora import layer as peft_lora_layer
    except ImportError as error:
        raise ImportError(
            "patch_peft and unpatch_peft work on models built by peft; install it with "
            "`pip install peft`"
        ) from error
    return peft_lora_layer


# --------------------------------------------------------------------------------------
# Saving and loading adapters in peft's format
# --------------------------------------------------------------------------------------


def _lora_places(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every (name, layer) where a LoRALinear is registered, shared ones at each name."""
    return [
        (name, m)
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, LoRALinear)
    ]


def _plain_number(value: float) -> int | float:
    """An integral float as int (peft writes r and lora_alpha as ints), else the float."""
    return int(value) if float(value).is_integer() else float(value)


def _most_common(values: list) -> object:
    """The most frequent value; ties go to the one seen first."""
    counts = collections.Counter(values)
    best = max(counts.values())
    return next(v for v in values if counts[v] == best)


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """peft's target_modules for exactly `names`: the short names ("q_proj") when they
    pick out exactly these modules in the model without adapters, else the full names."""
    short = sorted({name.rsplit(".", 1)[-1] for name in names})
    wanted = set(names)
    lora_names = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    matched = set()
    for name, _ in model.named_modules(remove_duplicate=False):
        # What a LoRALinear wraps is not a module of the model without adapters.
        parts = name.split(".")
        if any(".".join(parts[:i]) in lora_names for i in range(1, len(parts))):
            continue
        if name and name.rsplit(".", 1)[-1] in short:
            matched.add(name)
    return short if matched == wanted else sorted(wanted)


def _to_plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy; a sharded DTensor (FSDP2) is gathered first."""
    t = t.detach()
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.to("cpu", copy=True).contiguous()


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's and DDP's wrappers, whose names peft's keys use."""
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    *,
    is_main_process: bool | None = None,
) -> pathlib.Path:
    """Write the `LoRALinear` adapters of `model` to directory `path` in peft's format.

    Writes `adapter_config.json` (peft_type "LORA", r, lora_alpha, lora_dropout,
    target_modules, use_rslora, bias "none", fan_in_fan_out false, rank_pattern and
    alpha_pattern for the layers whose rank or alpha differ from the most common one,
    task_type and base_model_name_or_path if given) and `adapter_model.safetensors` with
    `base_model.model.<name>.lora_A.weight` [R, K] and `...lora_B.weight` [N, R] for
    every `LoRALinear` named <name> in `model` (in the adapter's dtype). The result
    loads with `peft.PeftModel.from_pretrained(base_model, path)` and with
    `load_adapter`.

    Under torch.distributed, call it on every rank: adapters sharded by FSDP2
    (DTensors) are gathered, a collective, and by default only rank 0 writes.

    Args:
        model: a model holding `LoRALinear` layers (from `apply_lora` or `load_adapter`);
            a `torch.compile` or `DistributedDataParallel` wrapper is looked through.
        path: the directory to write (created if needed; existing files are replaced).
        base_model_name_or_path: recorded in the config for peft's
            `AutoPeftModel*.from_pretrained`.
        task_type: peft's task type ("CAUSAL_LM", "SEQ_CLS", ...) or None.
        is_main_process: whether this process writes the files; None: rank 0 of the
            default process group when torch.distributed is initialized, else True.

    Raises:
        ValueError: no `LoRALinear` in `model`; layers that peft's format cannot express
            (a learnable scaling, an init="svd" layer whose base weight holds the PiSSA
            residual, different dropouts or use_rslora across layers), each named.

    Returns:
        the directory, as a `pathlib.Path`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be None or one of {TASK_TYPES}, got {task_type!r}")
    if is_main_process is not None and not isinstance(is_main_process, bool):
        raise TypeError(f"is_main_process must be a bool or None, got {is_main_process!r}")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(
            "base_model_name_or_path must be a str or None, got "
            f"{type(base_model_name_or_path).__name__}"
        )
    model = _unwrap(model)
    places = _lora_places(model)
    if not places:
        raise ValueError(
            "save_adapter: the model has no LoRALinear layer (use apply_lora or load_adapter)"
        )
    for name, layer in places:
        if layer.learnable_scaling:
            raise ValueError(
                f"save_adapter: {name!r} has a learnable scaling, which peft's format "
                "cannot hold (it stores lora_alpha, a constant)"
            )
        if layer._svd_US is not None:
            raise ValueError(
                f"save_adapter: {name!r} was initialised with init='svd' (PiSSA): its "
                "frozen weight is the residual W - s B0 A0, so an adapter saved alone would "
                "not apply to the original weight; save the merged model (merge_lora) instead"
            )
        expected = layer.alpha / (math.sqrt(layer.rank) if layer.use_rslora else layer.rank)
        if layer.scaling != expected:
            raise ValueError(
                f"save_adapter: {name!r} has scaling {layer.scaling!r}, but its alpha "
                f"{layer.alpha:g} and rank {layer.rank} give {expected!r}; peft's format "
                "stores alpha and rank only"
            )
    for attribute in ("dropout", "use_rslora"):
        values = {getattr(layer, attribute) for _, layer in places}
        if len(values) > 1:
            listing = ", ".join(f"{n!r}: {getattr(layer, attribute)!r}" for n, layer in places)
            raise ValueError(
                f"save_adapter: peft's format has one {attribute} for all layers, but the "
                f"layers differ ({listing})"
            )

    names = [name for name, _ in places]
    r = _most_common([layer.rank for _, layer in places])
    alpha = _most_common([layer.alpha for _, layer in places])
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": _plain_number(alpha),
        "lora_dropout": places[0][1].dropout,
        "use_rslora": places[0][1].use_rslora,
        "target_modules": _target_modules(model, names),
        "exclude_modules": None,
        "rank_pattern": {n: layer.rank for n, layer in places if layer.rank != r},
        "alpha_pattern": {
            n: _plain_number(layer.alpha) for n, layer in places if layer.alpha != alpha
        },
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors = {}
    for name, layer in places:
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = _to_plain_tensor(layer.lora_A)
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = _to_plain_tensor(layer.lora_B)

    if is_main_process is None:
        is_main_process = not _distributed() or torch.distributed.get_rank() == 0
    if not is_main_process:
        return pathlib.Path(path)
    st = _require_safetensors()
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    st.save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def _pattern_value(patterns: dict, name: str, default):
    """peft's `get_pattern_key` lookup: the first key k with re.match(rf"(.*\\.)?({k})$")."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def _check_config(config: dict, where: str) -> None:
    """Raise a ValueError naming the first entry of `config` that load_adapter cannot serve."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(f"{where}: entry 'peft_type' must be 'LORA', got {peft_type!r}")
    bias = config.get("bias", "none")
    if bias not in ("none", None):
        raise ValueError(
            f"{where}: entry 'bias' = {bias!r} is not supported: it trains the base "
            "layers' biases, which LoRALinear keeps frozen; only 'none' is"
        )
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"{where}: entry 'init_lora_weights' = {init!r} is not supported: that init "
            "changes the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) or is a LoRA "
            f"variant (MiCA), so the adapter does not apply to the original model; "
            f"supported: {list(_PLAIN_INITS)}. (peft can convert PiSSA/OLoRA/CorDA "
            "adapters to plain LoRA with save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...))"
        )
    for entry, value in config.items():
        if not value:
            continue
        if entry in _UNSUPPORTED_ENTRIES:
            raise ValueError(
                f"{where}: entry {entry!r} = {value!r} is not supported: "
                f"{_UNSUPPORTED_ENTRIES[entry]}"
            )
        if entry not in _KNOWN_ENTRIES:
            raise ValueError(
                f"{where}: entry {entry!r} = {value!r} is not supported: lora_kernels "
                "does not know it (a newer peft feature?) and will not guess what it means"
            )
    for entry in ("rank_pattern", "alpha_pattern"):
        value = config.get(entry) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{where}: entry {entry!r} must be a dict, got {value!r}")


def _read_weights(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """The tensors of adapter_model.safetensors (or adapter_model.bin) in `path`."""
    if (path / WEIGHTS_NAME).is_file():
        return dict(_require_safetensors().load_file(str(path / WEIGHTS_NAME)))
    if (path / WEIGHTS_NAME_BIN).is_file():
        return torch.load(path / WEIGHTS_NAME_BIN, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"load_adapter: {path} has neither {WEIGHTS_NAME} nor {WEIGHTS_NAME_BIN}"
    )


def _adapter_tensors(
    weights: dict[str, torch.Tensor], where: str
) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {"A": [R, K], "B": [N, R]}} from peft's keys; other keys raise."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        if not key.startswith(KEY_PREFIX):
            raise ValueError(f"{where}: key {key!r} does not start with {KEY_PREFIX!r}")
        rest = key[len(KEY_PREFIX) :]
        if rest.endswith(".lora_A.weight"):
            modules.setdefault(rest[: -len(".lora_A.weight")], {})["A"] = value
        elif rest.endswith(".lora_B.weight"):
            modules.setdefault(rest[: -len(".lora_B.weight")], {})["B"] = value
        elif ".lora_B.bias" in rest or rest.endswith("lora_B.bias"):
            raise ValueError(f"{where}: key {key!r} is a lora_bias, which is not supported")
        elif "lora_magnitude_vector" in rest:
            raise ValueError(f"{where}: key {key!r} is a DoRA magnitude, which is not supported")
        elif "lora_embedding_" in rest:
            raise ValueError(
                f"{where}: key {key!r} belongs to a LoRA on an embedding, which is not "
                "supported (only nn.Linear layers)"
            )
        elif "modules_to_save" in rest:
            raise ValueError(
                f"{where}: key {key!r} belongs to modules_to_save, which is not supported"
            )
        else:
            raise ValueError(
                f"{where}: key {key!r} is not a lora_A/lora_B weight of a linear layer "
                "and is not supported"
            )
    for name, pair in modules.items():
        for part in ("A", "B"):
            if part not in pair:
                raise ValueError(
                    f"{where}: {name!r} has no {KEY_PREFIX}{name}.lora_{part}.weight "
                    f"(it has lora_{'B' if part == 'A' else 'A'})"
                )
    return modules


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Wrap the modules listed in a peft LoRA directory with `LoRALinear` and load them.

    Reads `adapter_config.json` and `adapter_model.safetensors` (or the older
    `adapter_model.bin`) as written by `save_adapter` or by peft's `save_pretrained`.
    Every module named by a `base_model.model.<name>.lora_A.weight` key gets a
    `LoRALinear` with peft's per-module rank (rank_pattern, else r) and alpha
    (alpha_pattern, else lora_alpha), use_rslora and lora_dropout, holding the stored
    lora_A [R, K] and lora_B [N, R] (cast to the adapter dtype, see `LoRALinear`).
    Everything else is frozen, as after `apply_lora`. The default RNG is left as it was.

    Args:
        model: the base model, without adapters (module names as in peft's keys); a
            `torch.compile` or `DistributedDataParallel` wrapper is looked through.
        path: the adapter directory.

    Raises:
        FileNotFoundError: no adapter_config.json or weights file in `path`.
        ValueError: an unsupported entry (DoRA, lora_bias, bias other than "none",
            embeddings or other non-Linear targets, modules_to_save, an init that
            changes the base weights such as PiSSA/OLoRA, a LoRA variant), a key that
            is not a LoRA weight, a module that is missing from `model` or is already a
            `LoRALinear`, or a tensor whose shape does not fit its module (the module,
            the expected and the stored shape are named). The model is left unchanged.
        TypeError: a listed module that is not an `nn.Linear` (named with its type).

    Returns:
        `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = pathlib.Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {path}")
    config = json.loads(config_file.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    _check_config(config, str(config_file))
    weights_where = str(path / WEIGHTS_NAME)
    tensors = _adapter_tensors(_read_weights(path), weights_where)
    if not tensors:
        raise ValueError(f"load_adapter: {weights_where} holds no LoRA weights")

    r_default = config.get("r", 8)
    alpha_default = config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    use_rslora = bool(config.get("use_rslora", False))
    dropout = check_dropout_p(config.get("lora_dropout", 0.0) or 0.0, "lora_dropout")

    wrapper, model = model, _unwrap(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    plan = []
    for name, pair in tensors.items():
        if name not in modules:
            raise ValueError(
                f"load_adapter: the adapter has weights for {name!r}, which is not a module "
                f"of the model (peft's names are those of the base model's named_modules())"
            )
        module = modules[name]
        if isinstance(module, LoRALinear):
            raise ValueError(
                f"load_adapter: {name!r} is already a LoRALinear; load into the model "
                "without adapters (remove_lora or merge_lora first)"
            )
        if isinstance(module, nn.Embedding):
            raise TypeError(
                f"load_adapter: {name!r} is an nn.Embedding; LoRA on embeddings is not "
                "supported (only nn.Linear layers)"
            )
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            raise TypeError(
                f"load_adapter: {name!r} is a {type(module).__name__}; only torch.nn.Linear "
                "layers can take a LoRA adapter"
            )
        rank = _pattern_value(rank_pattern, name, r_default)
        alpha = _pattern_value(alpha_pattern, name, alpha_default)
        where = f"load_adapter: {name!r}"
        try:
            rank = check_rank(rank)
            alpha = check_alpha(alpha)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{where}: {error} (from r/rank_pattern, lora_alpha/alpha_pattern)"
            ) from None
        A, B = pair["A"], pair["B"]
        K, N = module.in_features, module.out_features
        if tuple(A.shape) != (rank, K):
            raise ValueError(
                f"{where}: lora_A.weight has shape {list(A.shape)}, expected [{rank}, {K}] "
                f"(rank {rank} from the config, in_features {K} of the module)"
            )
        if tuple(B.shape) != (N, rank):
            raise ValueError(
                f"{where}: lora_B.weight has shape {list(B.shape)}, expected [{N}, {rank}] "
                f"(out_features {N} of the module, rank {rank} from the config)"
            )
        for part, t in (("lora_A", A), ("lora_B", B)):
            if not t.is_floating_point():
                raise ValueError(f"{where}: {part}.weight has dtype {t.dtype}, not a float")
        plan.append((name, module, rank, alpha, A, B))

    # Building a LoRALinear draws its init from the default RNG; loading must not.
    with torch.random.fork_rng(devices=[]):
        built = [
            (
                name,
                LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora),
                A,
                B,
            )
            for name, module, rank, alpha, A, B in plan
        ]
    with torch.no_grad():
        for name, layer, A, B in built:
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, layer)
    mark_only_lora_as_trainable(model)
    return wrapper


# --------------------------------------------------------------------------------------
# Running a peft model through the fused op
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class PatchReport:
    """What `patch_peft` did.

    Attributes:
        patched: names of the peft `lora.Linear` modules whose forward now runs
            `lora_linear` (when a call can be served, see `patch_peft`).
        not_patched: name -> why, for every other peft LoRA module (they keep peft's
            forward).
        adapters_not_served: "name [adapter]" -> why, for adapters of patched modules
            that peft's own forward serves when they are active (DoRA, lora_bias, ...).
    """

    patched: list[str] = dataclasses.field(default_factory=list)
    not_patched: dict[str, str] = dataclasses.field(default_factory=dict)
    adapters_not_served: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"patch_peft: {len(self.patched)} lora.Linear module(s) run the fused op"]
        for name, why in self.not_patched.items():
            lines.append(f"  not patched {name}: {why}")
        for name, why in self.adapters_not_served.items():
            lines.append(f"  served by peft {name}: {why}")
        return "\n".join(lines)


def _adapter_problem(module, adapter: str) -> str | None:
    """Why `adapter` of a peft lora.Linear cannot run the fused op, or None."""
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        return f"LoRA variant {type(variant).__name__} (DoRA or similar)"
    if getattr(module, "lora_bias", {}).get(adapter, False):
        return "lora_bias=True"
    dropout = module.lora_dropout[adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"lora_dropout is a {type(dropout).__name__}, not nn.Dropout or nn.Identity"
    return None


def _module_problem(module, peft_linear) -> str | None:
    """Why a peft LoRA module cannot run the fused op at all, or None."""
    if type(module) is not peft_linear:
        return (
            f"a {type(module).__module__}.{type(module).__qualname__}, not peft's "
            "lora.Linear (embedding, convolution, quantized base layer, ...)"
        )
    base = module.base_layer
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"its base layer is a {type(base).__name__}, not a plain torch.nn.Linear"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out=True (transposed Conv1D weights)"
    return None


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` runs more than its forward (hooks, accelerate's _hf_hook)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or getattr(module, "_hf_hook", None) is not None
    )


def _is_plain(t: torch.Tensor | None) -> bool:
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def _fused_forward(self, x, *args, **kwargs):
    """peft's lora.Linear.forward, with the one-active-adapter case run by lora_linear.

    Anything else (disabled or merged adapters, several or no active adapters,
    adapter_names or other extra arguments, variants, lora_bias, dtypes the op does not
    take, hooks on the submodules, sharded tensors) goes to peft's own forward.
    """
    peft_forward = type(self).forward
    if args or any(k != "adapter_names" or v is not None for k, v in kwargs.items()):
        return peft_forward(self, x, *args, **kwargs)
    if self.disable_adapters or self.merged or not getattr(self, "cast_input_dtype_enabled", True):
        return peft_forward(self, x)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if len(active) != 1 or _adapter_problem(self, active[0]) is not None:
        return peft_forward(self, x)
    adapter = active[0]
    base = self.base_layer
    lora_A = self.lora_A[adapter]
    lora_B = self.lora_B[adapter]
    dropout = self.lora_dropout[adapter]
    weight, bias = base.weight, base.bias
    A, B = lora_A.weight, lora_B.weight
    if not isinstance(x, torch.Tensor) or not all(_is_plain(t) for t in (x, weight, bias, A, B)):
        return peft_forward(self, x)
    if torch.is_autocast_enabled(x.device.type):
        # What autocast does to peft's three nn.Linear calls: every operand in the
        # autocast dtype (the casts of A and B are differentiable, W and b are frozen).
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, A, B = (t if t is None else t.to(dtype) for t in (x, weight, bias, A, B))
    if (
        weight.dtype != x.dtype
        or (bias is not None and bias.dtype != x.dtype)
        or A.dtype != B.dtype
        or A.dtype not in (x.dtype, torch.float32)
        or any(_has_hooks(m) for m in (base, lora_A, lora_B, dropout))
    ):
        return peft_forward(self, x)
    if isinstance(dropout, nn.Dropout):
        p, training = dropout.p, dropout.training
        if not 0.0 <= p < 1.0:
            return peft_forward(self, x)
    else:
        p, training = 0.0, False
    scaling = self.scaling[adapter]
    if isinstance(scaling, bool) or not isinstance(scaling, (numbers.Real, torch.Tensor)):
        return peft_forward(self, x)
    return lora_linear(
        x,
        weight,
        bias,
        A,
        B,
        scaling,
        dropout_p=p,
        training=training,
        backend=self._lora_kernels_backend,
    )


def _is_patched(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _fused_forward


def patch_peft(peft_model: nn.Module, backend: str | None = None) -> PatchReport:
    """Make every peft `lora.Linear` of `peft_model` that can be served run `lora_linear`.

    In place and reversible (`unpatch_peft`): only the `forward` of those modules is
    replaced (an instance attribute); the module tree, the parameter names, the state
    dict and `save_pretrained` are untouched. A patched module computes, for x [*, K],
    base weight W [N, K], bias b [N] or None, active adapter lora_A.weight [R, K],
    lora_B.weight [N, R], scaling s and lora_dropout p (0 for nn.Identity; applied only
    while the dropout module is in training mode, as peft's nn.Dropout):

        Y = X W^T + b + s * (dropout(X) A^T) B^T       [*, N] in x's dtype

    which is what peft computes (peft casts X to the adapter dtype for the branch; the
    fused op takes float32 adapters with half-precision X directly). The dropout mask
    differs from peft's (it is the op's Philox mask, seeded from torch's default
    generator), with the same distribution. A call goes to peft's own forward when
    adapters are disabled or merged, when not exactly one active adapter is present,
    with `adapter_names` or other extra arguments, for a LoRA variant (DoRA, ...) or
    lora_bias, or when a submodule has hooks or the dtypes do not fit the op, so those
    behave exactly as in peft.

    Args:
        peft_model: a `peft.PeftModel`, a `LoraModel`, or any module holding peft LoRA
            layers.
        backend: passed to `lora_linear` (None: the automatic choice).

    Raises:
        ImportError: peft is not installed.
        ValueError: the model holds no peft LoRA layer, or an unknown backend.

    Returns:
        a `PatchReport`: the patched modules, and why the others were not.
    """
    peft_lora_layer = _require_peft()
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be a torch.nn.Module, got {type(peft_model).__name__}")
    check_backend(backend)
    report = PatchReport()
    lora_modules = [
        (name, m)
        for name, m in peft_model.named_modules()
        if isinstance(m, peft_lora_layer.LoraLayer)
    ]
    if not lora_modules:
        raise ValueError(
            "patch_peft: the model holds no peft LoRA layer (build it with "
            "peft.get_peft_model or PeftModel.from_pretrained)"
        )
    for name, module in lora_modules:
        problem = _module_problem(module, peft_lora_layer.Linear)
        if problem is None:
            adapters = {a: _adapter_problem(module, a) for a in module.lora_A}
            if adapters and all(why is not None for why in adapters.values()):
                problem = "; ".join(f"adapter {a!r}: {why}" for a, why in adapters.items())
            elif not adapters:
                problem = "no LoRA adapter on this module"
        if problem is not None:
            report.not_patched[name] = problem
            continue
        for adapter, why in adapters.items():
            if why is not None:
                report.adapters_not_served[f"{name} [{adapter}]"] = why
        module._lora_kernels_backend = backend
        module.forward = types.MethodType(_fused_forward, module)
        report.patched.append(name)
    return report


def unpatch_peft(peft_model: nn.Module) -> list[str]:
    """Give every module patched by `patch_peft` its peft forward back.

    Returns:
        the names of the modules restored (empty if none was patched).
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(f"peft_model must be a torch.nn.Module, got {type(peft_model).__name__}")
    restored = []
    for name, module in peft_model.named_modules():
        if _is_patched(module):
            del module.__dict__["forward"]
            module.__dict__.pop("_lora_kernels_backend", None)
            restored.append(name)
    return restored


__all__ = [
    "PatchReport",
    "load_adapter",
    "patch_peft",
    "save_adapter",
    "unpatch_peft",
]
