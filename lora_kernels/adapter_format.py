"""peft's LoRA adapter format: `save_adapter` and `load_adapter`.

A directory in peft's format (`adapter_config.json` + `adapter_model.safetensors`) lets
a model adapted with `apply_lora` and a `peft.PeftModel` exchange adapters both ways.
Keys are peft's: `base_model.model.<module path>.lora_A.weight` [R, K] and
`base_model.model.<module path>.lora_B.weight` [N, R], where <module path> is the
module's name in the base model (`model.named_modules()` of the model without
adapters, e.g. "model.layers.0.self_attn.q_proj"). A module trained whole
(`modules_to_save`, a `ModuleToSave` here) is stored as its trained copy's state_dict
under the module's own name, `base_model.model.<module path>.<tensor>` (peft drops the
`modules_to_save.<adapter name>.` of its in-memory keys when it saves).

safetensors is optional: it is imported by the functions that read or write it.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import re

import torch
from torch import nn

from .layer import LoRALinear
from .model import (
    ModuleToSave,
    check_modules_to_save,
    is_inside,
    lora_places,
    mark_only_lora_as_trainable,
    match_modules_to_save,
    replace_module,
    saved_copies,
)
from .quant4bit import is_4bit_weight
from .validation import check_alpha, check_dropout_p, check_module, check_rank

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
# The modules_to_save that peft's PeftModelFor<task> adds to the config's own, when it
# builds or loads a model of that task type (PeftModelForSequenceClassification, ...).
TASK_MODULES_TO_SAVE = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}
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
    """safetensors.torch, or an ImportError saying how to install it."""
    try:
        import safetensors.torch
    except ImportError as error:
        raise ImportError(
            "reading and writing adapter_model.safetensors needs the safetensors package "
            "(pip install safetensors)"
        ) from error
    return safetensors.torch


# --------------------------------------------------------------------------------------
# Names and tensors shared by saving and loading
# --------------------------------------------------------------------------------------


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
    """Whether this process is one rank of an initialised torch.distributed group."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


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
    task_type and base_model_name_or_path if given, modules_to_save: the full names of
    the `ModuleToSave` modules) and `adapter_model.safetensors` with
    `base_model.model.<name>.lora_A.weight` [R, K] and `...lora_B.weight` [N, R] for
    every `LoRALinear` named <name> in `model` (in the adapter's dtype), and
    `base_model.model.<name>.<key>` for every entry <key> of the trained copy's
    state_dict of every `ModuleToSave` named <name> (in its own dtype). The result
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
            residual, different dropouts or use_rslora across layers), each named;
            modules that peft would train whole on loading but that are not a
            `ModuleToSave` here: those of the task type (SEQ_CLS and TOKEN_CLS add
            "classifier" and "score", QUESTION_ANS "qa_outputs", matched as names
            ending so), or others whose names end with a saved module's name.

    Returns:
        the directory, as a `pathlib.Path`.
    """
    _check_save_arguments(model, base_model_name_or_path, task_type, is_main_process)
    model = _unwrap(model)
    places = lora_places(model)
    _check_expressible(places)
    copies = saved_copies(model)
    _check_modules_to_save_expressible(model, places, copies, task_type)
    config = _adapter_config(model, places, copies, base_model_name_or_path, task_type)
    # Every rank gathers (a collective for FSDP2's DTensors), whichever one writes.
    tensors = _adapter_weights(places, copies)
    if is_main_process is None:
        is_main_process = not _distributed() or torch.distributed.get_rank() == 0
    if not is_main_process:
        return pathlib.Path(path)
    return _write_adapter(pathlib.Path(path), config, tensors)


def _check_save_arguments(model, base_model_name_or_path, task_type, is_main_process) -> None:
    """save_adapter's arguments, each named when it is refused."""
    check_module("model", model)
    if task_type is not None and task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be None or one of {TASK_TYPES}, got {task_type!r}")
    if is_main_process is not None and not isinstance(is_main_process, bool):
        raise TypeError(f"is_main_process must be a bool or None, got {is_main_process!r}")
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(
            "base_model_name_or_path must be a str or None, got "
            f"{type(base_model_name_or_path).__name__}"
        )


def _check_expressible(places: list[tuple[str, LoRALinear]]) -> None:
    """Raise a ValueError naming the first layer that peft's format cannot hold."""
    if not places:
        raise ValueError(
            "save_adapter: the model has no LoRALinear layer (use apply_lora or load_adapter)"
        )
    for name, layer in places:
        if layer.use_dora:
            raise ValueError(
                f"save_adapter: {name!r} is a DoRA layer (use_dora=True), and writing DoRA "
                "adapters (use_dora and peft's lora_magnitude_vector keys) is not "
                "supported yet; lora_state_dict(model) holds its tensors, lora_magnitude "
                "included"
            )
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


def _base_module_names(model: nn.Module) -> list[str]:
    """named_modules() names of the model without adapters: what a LoRALinear wraps is
    dropped, and a ModuleToSave's original module's children keep their own names."""
    modules = list(model.named_modules(remove_duplicate=False))
    lora_names = {name for name, m in modules if isinstance(m, LoRALinear)}
    copy_names = {name for name, m in modules if isinstance(m, ModuleToSave)}
    names = []
    for name, _ in modules:
        if is_inside(name, lora_names):
            continue
        owner = next((w for w in copy_names if is_inside(name, {w})), None)
        if owner is not None:
            # "<owner>.original_module.<rest>" is "<owner>.<rest>" without adapters.
            head, _, rest = name[len(owner) + 1 :].partition(".")
            if head != "original_module" or not rest:
                continue
            name = f"{owner}.{rest}"
        names.append(name)
    return names


def _check_modules_to_save_expressible(
    model: nn.Module,
    places: list[tuple[str, LoRALinear]],
    copies: list[tuple[str, ModuleToSave]],
    task_type: str | None,
) -> None:
    """Raise a ValueError unless peft, loading the adapter, trains whole exactly the
    modules that are ModuleToSave here, and adapts every LoRALinear: it copies each
    module whose name ends with an entry of modules_to_save (ours and the task
    type's), and gives no adapter to those or what lies inside them."""
    copied = {name for name, _ in copies}
    task_entries = TASK_MODULES_TO_SAVE.get(task_type, [])
    entries = sorted(copied) + task_entries
    base_names = [n for n in _base_module_names(model) if n]
    peft_copies = {n for n in base_names if any((KEY_PREFIX + n).endswith(e) for e in entries)}
    extra = sorted(peft_copies - copied)
    if extra:
        because = (
            f"task_type={task_type!r} makes peft train whole every module whose name ends "
            f"with one of {task_entries}"
            if any(n.endswith(e) for n in extra for e in task_entries)
            else f"peft trains whole every module whose name ends with one of {sorted(copied)}"
        )
        raise ValueError(
            f"save_adapter: {because}, so on loading it would expect trained copies of "
            f"{extra}, which this model does not have (they are not ModuleToSave); pass "
            f"them to apply_lora(..., modules_to_save=[...]) before training"
            + (", or save with another task_type" if task_entries else "")
        )
    for name, _ in places:
        inside = [m for m in entries if re.match(rf"(^|.*\.){m}($|\..*)", name)]
        if inside:
            raise ValueError(
                f"save_adapter: peft would give {name!r} no adapter, since it lies in "
                f"modules_to_save {inside}"
            )


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
    copied = {name for name, _ in saved_copies(model)}
    matched = set()
    for name in _base_module_names(model):
        # peft gives no adapter to what lies in a module it trains whole.
        if name in copied or is_inside(name, copied):
            continue
        if name and name.rsplit(".", 1)[-1] in short:
            matched.add(name)
    return short if matched == wanted else sorted(wanted)


def _adapter_config(
    model: nn.Module,
    places: list[tuple[str, LoRALinear]],
    copies: list[tuple[str, ModuleToSave]],
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> dict:
    """adapter_config.json's entries: the most common rank and alpha as r and
    lora_alpha, the layers that differ in rank_pattern and alpha_pattern, the
    modules trained whole as modules_to_save."""
    names = [name for name, _ in places]
    r = _most_common([layer.rank for _, layer in places])
    alpha = _most_common([layer.alpha for _, layer in places])
    return {
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
        "modules_to_save": sorted(name for name, _ in copies) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _adapter_weights(
    places: list[tuple[str, LoRALinear]], copies: list[tuple[str, ModuleToSave]]
) -> dict[str, torch.Tensor]:
    """peft's keys -> CPU copies of lora_A [R, K] and lora_B [N, R], in the adapter
    dtype, and of each trained copy's state_dict, in its own dtype."""
    tensors = {}
    for name, layer in places:
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = _to_plain_tensor(layer.lora_A)
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = _to_plain_tensor(layer.lora_B)
    for name, wrapper in copies:
        for key, t in wrapper.trainable_copy.state_dict().items():
            tensors[f"{KEY_PREFIX}{name}.{key}"] = _to_plain_tensor(t)
    return tensors


def _write_adapter(path: pathlib.Path, config: dict, tensors: dict) -> pathlib.Path:
    """Write the weights and the config into directory `path` (created if needed)."""
    st = _require_safetensors()
    path.mkdir(parents=True, exist_ok=True)
    st.save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Wrap the modules listed in a peft LoRA directory with `LoRALinear` and load them.

    Reads `adapter_config.json` and `adapter_model.safetensors` (or the older
    `adapter_model.bin`) as written by `save_adapter` or by peft's `save_pretrained`.
    Every module named by a `base_model.model.<name>.lora_A.weight` key gets a
    `LoRALinear` with peft's per-module rank (rank_pattern, else r) and alpha
    (alpha_pattern, else lora_alpha), use_rslora and lora_dropout, holding the stored
    lora_A [R, K] and lora_B [N, R] (cast to the adapter dtype, see `LoRALinear`).
    Every module that peft trains whole (its name ends with an entry of the config's
    modules_to_save or of its task type's: "classifier" and "score" for SEQ_CLS and
    TOKEN_CLS, "qa_outputs" for QUESTION_ANS; entries that match nothing are passed
    over, as peft does) becomes a `ModuleToSave` whose trainable copy holds the stored
    `base_model.model.<name>.<key>` tensors (cast to the module's dtypes). Everything
    else is frozen, as after `apply_lora`. The default RNG is left as it was.

    Args:
        model: the base model, without adapters (module names as in peft's keys); a
            `torch.compile` or `DistributedDataParallel` wrapper is looked through.
        path: the adapter directory.

    Raises:
        FileNotFoundError: no adapter_config.json or weights file in `path`.
        ValueError: an unsupported entry (DoRA, lora_bias, bias other than "none",
            embeddings or other non-Linear targets, modules_to_save, an init that
            changes the base weights such as PiSSA/OLoRA, a LoRA variant), a key that
            is not a LoRA weight or a tensor of a module to save, a module that is
            missing from `model` or is already a `LoRALinear` or `ModuleToSave`, a
            LoRA weight inside a module to save, a module to save whose tensors are
            missing, or a tensor whose shape does not fit its module (the module, the
            expected and the stored shape are named). The model is left unchanged.
        TypeError: a listed module that is not an `nn.Linear` (named with its type);
            modules_to_save that is not a list of names, or matches a container.

    Returns:
        `model`.
    """
    check_module("model", model)
    path = pathlib.Path(path)
    config = _read_config(path)
    weights_where = str(path / WEIGHTS_NAME)
    weights = _read_weights(path)
    settings = _LayerSettings(config)
    wrapper, model = model, _unwrap(model)
    # Everything is checked before the model changes: a refused adapter leaves it as it was.
    copy_plan = _plan_copies(model, config, weights, weights_where)
    tensors = _adapter_tensors(weights, weights_where)
    if not tensors:
        raise ValueError(f"load_adapter: {weights_where} holds no LoRA weights")
    modules = dict(model.named_modules(remove_duplicate=False))
    copied = {name for name, _, _ in copy_plan}
    plan = [_plan_layer(name, pair, modules, settings, copied) for name, pair in tensors.items()]
    _install_layers(model, plan, settings)
    _install_copies(model, copy_plan)
    mark_only_lora_as_trainable(model)
    return wrapper


def _read_config(path: pathlib.Path) -> dict:
    """adapter_config.json of `path`, checked by `_check_config`."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {path}")
    config = json.loads(config_file.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    _check_config(config, str(config_file))
    return config


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
    modules_to_save = config.get("modules_to_save")
    if modules_to_save is not None:
        try:
            check_modules_to_save("modules_to_save", modules_to_save)
        except TypeError as error:
            raise ValueError(f"{where}: entry {error}") from None


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
                f"{where}: key {key!r} holds a module to save under peft's in-memory "
                "name; saved adapters store it as base_model.model.<module>.<tensor>"
            )
        else:
            raise ValueError(
                f"{where}: key {key!r} is not a lora_A/lora_B weight of a linear layer "
                "nor a tensor of a module in modules_to_save, and is not supported"
            )
    for name, pair in modules.items():
        for part in ("A", "B"):
            if part not in pair:
                raise ValueError(
                    f"{where}: {name!r} has no {KEY_PREFIX}{name}.lora_{part}.weight "
                    f"(it has lora_{'B' if part == 'A' else 'A'})"
                )
    return modules


class _LayerSettings:
    """The config's per-layer settings: rank and alpha (with their patterns), and the
    dropout and use_rslora that every layer shares."""

    def __init__(self, config: dict):
        self.r_default = config.get("r", 8)
        self.alpha_default = config.get("lora_alpha", 8)
        self.rank_pattern = config.get("rank_pattern") or {}
        self.alpha_pattern = config.get("alpha_pattern") or {}
        self.use_rslora = bool(config.get("use_rslora", False))
        self.dropout = check_dropout_p(config.get("lora_dropout", 0.0) or 0.0, "lora_dropout")

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """Module `name`'s rank and alpha, checked (peft's pattern lookup)."""
        rank = _pattern_value(self.rank_pattern, name, self.r_default)
        alpha = _pattern_value(self.alpha_pattern, name, self.alpha_default)
        try:
            return check_rank(rank), check_alpha(alpha)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"load_adapter: {name!r}: {error} (from r/rank_pattern, lora_alpha/alpha_pattern)"
            ) from None


def _plan_copies(
    model: nn.Module, config: dict, weights: dict[str, torch.Tensor], where: str
) -> list[tuple[str, nn.Module, dict[str, torch.Tensor]]]:
    """(name, module, {state_dict key: stored tensor}) for every module peft trains
    whole, each checked; its tensors are taken out of `weights`."""
    entries = list(config.get("modules_to_save") or [])
    entries += TASK_MODULES_TO_SAVE.get(config.get("task_type"), [])
    if not entries:
        return []
    argument = "the adapter's modules_to_save"
    matched, _ = match_modules_to_save(model, entries, argument)
    plan = []
    for name, module in matched:
        if isinstance(module, ModuleToSave):
            raise ValueError(
                f"load_adapter: {name!r} is already a ModuleToSave; load into the model "
                "without adapters (remove_lora first)"
            )
        stored = {}
        for key, current in module.state_dict().items():
            saved_key = f"{KEY_PREFIX}{name}.{key}"
            if saved_key not in weights:
                raise ValueError(
                    f"load_adapter: {name!r} is in modules_to_save ({entries}), but {where} "
                    f"has no {saved_key!r} for its {key!r}"
                )
            value = weights[saved_key]
            if value.shape != current.shape:
                raise ValueError(
                    f"load_adapter: {saved_key!r} has shape {list(value.shape)}, but "
                    f"{name}.{key} of the model has shape {list(current.shape)}"
                )
            if value.is_floating_point() != current.is_floating_point():
                raise ValueError(
                    f"load_adapter: {saved_key!r} has dtype {value.dtype}, but "
                    f"{name}.{key} of the model is {current.dtype}"
                )
            stored[key] = value
        plan.append((name, module, stored))
    for name, _, stored in plan:
        for key in stored:
            del weights[f"{KEY_PREFIX}{name}.{key}"]
    return plan


def _install_copies(model: nn.Module, plan: list) -> None:
    """Put a ModuleToSave in each planned module's place, its copy holding the stored
    tensors."""
    for name, module, stored in plan:
        wrapper = ModuleToSave(module)
        copied = wrapper.trainable_copy.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, value in stored.items():
                copied[key].copy_(value)
        replace_module(model, name, wrapper)


def _check_target(name: str, modules: dict[str, nn.Module], copied: set[str]) -> nn.Linear:
    """The module named `name`, if it can take a LoRA adapter; else an error naming it."""
    if name in copied or is_inside(name, copied):
        raise ValueError(
            f"load_adapter: the adapter has LoRA weights for {name!r}, which is (or lies "
            "in) a module to save; peft trains such modules whole, without adapters"
        )
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
    # A bitsandbytes Linear4bit has a forward of its own, which LoRALinear replaces.
    plain = type(module).forward is nn.Linear.forward or is_4bit_weight(module.weight)
    if not isinstance(module, nn.Linear) or not plain:
        raise TypeError(
            f"load_adapter: {name!r} is a {type(module).__name__}; only torch.nn.Linear "
            "layers can take a LoRA adapter"
        )
    return module


def _plan_layer(
    name: str,
    pair: dict[str, torch.Tensor],
    modules: dict[str, nn.Module],
    settings: _LayerSettings,
    copied: set[str],
) -> tuple[str, nn.Linear, int, float, torch.Tensor, torch.Tensor]:
    """(name, module, rank, alpha, A, B) for one adapted module, every part checked."""
    module = _check_target(name, modules, copied)
    rank, alpha = settings.rank_and_alpha(name)
    where = f"load_adapter: {name!r}"
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
    return name, module, rank, alpha, A, B


def _install_layers(model: nn.Module, plan: list, settings: _LayerSettings) -> None:
    """Build a LoRALinear per planned module, fill in the stored A and B, and put it
    in the module's place."""
    # Building a LoRALinear draws its init from the default RNG; loading must not.
    with torch.random.fork_rng(devices=[]):
        built = [
            (
                name,
                LoRALinear(
                    module,
                    rank=rank,
                    alpha=alpha,
                    dropout=settings.dropout,
                    use_rslora=settings.use_rslora,
                ),
                A,
                B,
            )
            for name, module, rank, alpha, A, B in plan
        ]
    with torch.no_grad():
        for name, layer, A, B in built:
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            replace_module(model, name, layer)


__all__ = ["load_adapter", "save_adapter"]
