"""Model-level helpers: put `LoRALinear` adapters into a model, switch, merge, save them.

Module names are those of `model.named_modules()` ("layers.0.attn.q_proj"); the keys
of `lora_state_dict` are the matching `model.state_dict()` keys of the adapter
parameters ("layers.0.attn.q_proj.lora_A", "classifier.trainable_copy.weight").
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from .layer import LoRALinear
from .validation import (
    ALL_LINEAR,
    check_alpha,
    check_backend,
    check_dropout_p,
    check_flag,
    check_init,
    check_module,
    check_rank,
    module_matcher,
)

# How many module names an error message lists before it says "and N more".
_MAX_LISTED = 40


def _listing(names: list[str]) -> str:
    """names as "['a', 'b', ...]" for an error message, at most _MAX_LISTED of them."""
    shown = ", ".join(repr(n) for n in names[:_MAX_LISTED])
    if len(names) > _MAX_LISTED:
        shown += f", ... and {len(names) - _MAX_LISTED} more"
    return f"[{shown}]"


def is_inside(name: str, prefixes: set[str]) -> bool:
    """Whether `name` is a strict descendant of a module named in `prefixes`."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in prefixes for i in range(1, len(parts)))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Register `new` at `name` ("a.b.c") of `model`, in place of what was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class ModuleToSave(nn.Module):
    """A trainable full copy of a module beside the frozen original: peft's
    `modules_to_save` (its `ModulesToSaveWrapper`), for a classification head, say.

    The forward runs `trainable_copy` while `enabled`, else `original_module`, with the
    caller's arguments as they are. An attribute that the wrapper does not have is
    read from the module that runs (`head.weight`, `head.out_features`), as peft does.

    Args:
        module: the module to copy (`copy.deepcopy`); it stays in place as
            `original_module`, frozen. The copy's parameters are made trainable.
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.trainable_copy = copy.deepcopy(module)
        self.enabled = True
        self.original_module.requires_grad_(False)
        self.trainable_copy.requires_grad_(True)

    @property
    def active_module(self) -> nn.Module:
        """The module that forward runs: the copy while enabled, else the original."""
        return self.trainable_copy if self.enabled else self.original_module

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Not yet initialised (unpickling, copying): nothing to delegate to.
            if "trainable_copy" not in self.__dict__.get("_modules", {}):
                raise
        return getattr(self.active_module, name)


def lora_places(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """Every (name, layer) where a LoRALinear is registered, shared ones at each name."""
    return [
        (name, m)
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, LoRALinear)
    ]


def saved_copies(model: nn.Module) -> list[tuple[str, ModuleToSave]]:
    """Every (name, wrapper) where a `ModuleToSave` is registered (modules_to_save)."""
    return [
        (name, m)
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, ModuleToSave)
    ]


# Containers have no forward of their own to copy (peft refuses them as well).
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def check_modules_to_save(argument: str, entries) -> list[str]:
    """entries as a list of non-empty names, or a TypeError naming `argument`."""
    if isinstance(entries, str) or not isinstance(entries, (list, tuple)):
        raise TypeError(
            f"{argument} must be None or a list of module names, got {entries!r} "
            f"({type(entries).__name__})"
        )
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise TypeError(
                f"{argument} entries must be non-empty module names (str), got {entry!r}"
            )
    return list(entries)


def match_modules_to_save(
    model: nn.Module, entries: list[str], argument: str
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """The modules that peft's modules_to_save `entries` pick out of `model`, and the
    entries that pick out none.

    peft's rule (`_set_trainable`): a module matches when its full name ends with an
    entry, as a string ("score" matches "score" and "head.score"). Names inside a
    `LoRALinear` or a `ModuleToSave` are not candidates; a match that cannot be
    copied raises: a `LoRALinear` or a module holding one or a `ModuleToSave`, a
    container, a module
    registered under several names (one copy would untie them), or a match inside
    another match.
    """
    modules = list(model.named_modules(remove_duplicate=False))
    wrapped = {n for n, m in modules if isinstance(m, (LoRALinear, ModuleToSave))}
    names_of: dict[int, list[str]] = {}
    for name, module in modules:
        names_of.setdefault(id(module), []).append(name)
    matched: list[tuple[str, nn.Module]] = []
    found: set[str] = set()
    for name, module in modules:
        if not name or is_inside(name, wrapped):
            continue
        hits = [e for e in entries if name.endswith(e)]
        if not hits:
            continue
        found.update(hits)
        where = f"{argument} matches {name!r}"
        if isinstance(module, _CONTAINERS):
            raise TypeError(
                f"{where}, a {type(module).__name__}, which has no forward to copy; name "
                "the modules inside it"
            )
        if isinstance(module, LoRALinear) or any(
            isinstance(m, LoRALinear) for m in module.modules()
        ):
            raise ValueError(
                f"{where}, which is or holds a LoRALinear; a module is either adapted or "
                "trained whole (remove_lora or merge_lora first)"
            )
        if not isinstance(module, ModuleToSave) and any(
            isinstance(m, ModuleToSave) for m in module.modules()
        ):
            raise ValueError(
                f"{where}, which holds a ModuleToSave; a copy of a copy would train the "
                "inner module twice over (name the modules beside it instead)"
            )
        if len(names_of[id(module)]) > 1:
            raise ValueError(
                f"{where}, which is also registered as {_listing(names_of[id(module)])}; a "
                "trainable copy at one name would untie them"
            )
        outer = [n for n, _ in matched if is_inside(name, {n})]
        if outer:
            raise ValueError(
                f"{where}, which lies inside {outer[0]!r}, also matched; a copy of "
                f"{outer[0]!r} already holds it (name only the outer module)"
            )
        matched.append((name, module))
    return matched, [e for e in entries if e not in found]


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: str | list[str] | None = None,
    exclude_modules: str | list[str] | None = None,
    init: str = "kaiming",
    use_rslora: bool = False,
    *,
    learnable_scaling: bool = False,
    backend: str | None = None,
    modules_to_save: list[str] | None = None,
    use_dora: bool = False,
) -> nn.Module:
    """Replace the matching `nn.Linear` modules of `model` in place by `LoRALinear`.

    Args:
        model: any module; its `nn.Linear` submodules are the candidates.
        rank, alpha, dropout, init, use_rslora, learnable_scaling, backend, use_dora:
            passed to every `LoRALinear` (see there).
        target_modules: None or "all-linear": every `nn.Linear` (unlike peft, the
            output layer too: exclude it with `exclude_modules`); a list of names: a
            module matches when its full name equals an entry or ends with
            "." + entry; a string: a regex that must match the full name.
        exclude_modules: same forms (None excludes nothing); matching modules are left
            alone.
        modules_to_save: None, or names of modules to train whole, as peft's
            `modules_to_save` (a freshly initialised classification head, say): each
            module whose full name ends with an entry ("classifier" matches
            "classifier" and "head.classifier", peft's rule) is replaced by a
            `ModuleToSave`, a trainable copy beside the frozen original. Such modules,
            and everything inside them, take no LoRA adapter (peft's rule too).
            A module already wrapped by an earlier call counts as matched.

    Everything but the adapters and the trainable copies (old and new) is frozen. A
    `nn.Linear` shared under several names gets one `LoRALinear`, placed at each of
    them. The model is checked completely before it is changed: on error it is left
    as it was.

    Raises:
        ValueError: nothing matches (the message lists the linear modules seen), or an
            explicit target is already a `LoRALinear`, or a bad rank/alpha/dropout/init;
            a modules_to_save entry that matches no module, or matches a `LoRALinear`
            (or a module holding one or a `ModuleToSave`), a module registered under
            several names, or a module inside another match.
        TypeError: an explicit target is not an `nn.Linear` (it is named), or is the
            `out_proj` of an `nn.MultiheadAttention` (which reads `out_proj.weight`
            directly and would bypass the adapter), or `model` itself is an `nn.Linear`;
            modules_to_save is not a list of names, or matches a container
            (`nn.ModuleList`, ...).

    Returns:
        `model`.
    """
    check_module("model", model)
    if isinstance(model, nn.Linear):
        raise TypeError(
            "apply_lora replaces submodules in place and cannot replace the model itself; "
            "wrap a bare nn.Linear with LoRALinear(layer, ...) instead"
        )
    # Every argument is checked before the model is touched.
    settings = {
        "rank": check_rank(rank),
        "alpha": check_alpha(alpha),
        "dropout": check_dropout_p(dropout, "dropout"),
        "init": check_init(init),
        "use_rslora": check_flag("use_rslora", use_rslora),
        "learnable_scaling": check_flag("learnable_scaling", learnable_scaling),
        "backend": check_backend(backend),
        "use_dora": check_flag("use_dora", use_dora),
    }
    to_copy = _select_modules_to_save(model, modules_to_save)
    targets, skipped_mha = _select_targets(
        model, target_modules, exclude_modules, {name for name, _ in to_copy}
    )
    if skipped_mha:
        warnings.warn(
            f"apply_lora: left {_listing(skipped_mha)} without adapter: nn.MultiheadAttention "
            "reads out_proj.weight directly, so a LoRA adapter there would be bypassed",
            stacklevel=2,
        )
    if init == "svd":
        _check_svd_rank(targets, settings["rank"])
    layers, copies = _build_layers(model, targets, to_copy, settings)
    for lora, names in layers:
        for name in names:
            replace_module(model, name, lora)
    for name, wrapper in copies:
        replace_module(model, name, wrapper)
    mark_only_lora_as_trainable(model)
    return model


def _select_modules_to_save(model: nn.Module, modules_to_save) -> list[tuple[str, nn.Module]]:
    """The modules apply_lora copies for modules_to_save (not those already copied);
    raises for an entry that matches nothing."""
    if modules_to_save is None:
        return []
    entries = check_modules_to_save("modules_to_save", modules_to_save)
    matched, unmatched = match_modules_to_save(model, entries, "modules_to_save")
    if unmatched:
        wrapped = {n for n, m in model.named_modules() if isinstance(m, (LoRALinear, ModuleToSave))}
        short = {
            n.rsplit(".", 1)[-1]
            for n, _ in model.named_modules()
            if n and not is_inside(n, wrapped)
        }
        raise ValueError(
            f"modules_to_save entries {unmatched!r} match no module (a module matches "
            f"when its full name ends with the entry); the last parts of the model's "
            f"module names are {_listing(sorted(short))}"
        )
    return [(name, m) for name, m in matched if not isinstance(m, ModuleToSave)]


def _select_targets(
    model: nn.Module, target_modules, exclude_modules, to_copy: set[str]
) -> tuple[list[tuple[nn.Linear, list[str]]], list[str]]:
    """The nn.Linear layers apply_lora wraps, each with every name it is registered
    under, and the nn.MultiheadAttention out_proj names it skipped; raises when an
    explicit target cannot be adapted or nothing matches. Modules in `to_copy` or
    already copied (modules_to_save), and everything inside them, are no candidates."""
    explicit = target_modules is not None and target_modules != ALL_LINEAR
    is_target = module_matcher("target_modules", target_modules)
    is_excluded = (
        (lambda name: False)
        if exclude_modules is None
        else module_matcher("exclude_modules", exclude_modules)
    )

    modules = list(model.named_modules(remove_duplicate=False))
    lora_names = {name for name, m in modules if isinstance(m, LoRALinear)}
    copied = to_copy | {name for name, m in modules if isinstance(m, ModuleToSave)}
    mha_out_proj = {id(m.out_proj) for _, m in modules if isinstance(m, nn.MultiheadAttention)}
    linear_seen: list[str] = []
    # id -> nn.Linear to wrap; a shared layer is wrapped at every name it is registered
    # under, once one of them matches, so that one weight never behaves two ways.
    targets: dict[int, nn.Linear] = {}
    names_of: dict[int, list[str]] = {}
    # The root cannot be replaced in place, what a LoRALinear wraps is not a candidate,
    # and peft gives no adapter to a module it trains whole or to anything inside it.
    skipped_copied = sorted(copied)
    modules = [
        (n, m)
        for n, m in modules
        if n and not is_inside(n, lora_names | copied) and n not in copied
    ]
    for name, module in modules:
        names_of.setdefault(id(module), []).append(name)
    skipped_mha: list[str] = []
    for name, module in modules:
        if isinstance(module, nn.Linear):
            linear_seen.append(name)
        if not is_target(name) or is_excluded(name):
            continue
        if isinstance(module, LoRALinear):
            if explicit:
                raise ValueError(
                    f"target_modules matches {name!r}, which is already a LoRALinear; "
                    "apply_lora wraps each nn.Linear once (remove_lora or merge_lora first)"
                )
            continue
        if not isinstance(module, nn.Linear):
            if explicit:
                raise TypeError(
                    f"target_modules matches {name!r}, a {type(module).__name__}; only "
                    "torch.nn.Linear modules can take a LoRA adapter"
                )
            continue
        if id(module) in mha_out_proj:
            if explicit:
                raise TypeError(
                    f"target_modules matches {name!r}, the out_proj of an "
                    "nn.MultiheadAttention, which uses out_proj.weight directly and would "
                    "bypass the adapter"
                )
            skipped_mha.append(name)
            continue
        targets[id(module)] = module

    if not targets:
        raise ValueError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) "
            f"matches no nn.Linear to adapt; the nn.Linear modules of the model are "
            f"{_listing(linear_seen)}"
            + (
                f" ({_listing(skipped_mha)} skipped: nn.MultiheadAttention reads "
                "out_proj.weight directly)"
                if skipped_mha
                else ""
            )
            + (
                f" ({_listing(skipped_copied)} skipped: in modules_to_save, trained whole)"
                if skipped_copied
                else ""
            )
        )
    return [(linear, names_of[key]) for key, linear in targets.items()], skipped_mha


def _check_svd_rank(targets: list[tuple[nn.Linear, list[str]]], rank: int) -> None:
    """init="svd" takes R singular triplets: R <= min(K, N) for every target."""
    for linear, names in targets:
        if rank > min(linear.in_features, linear.out_features):
            raise ValueError(
                "init='svd' needs rank <= min(in_features, out_features); "
                f"{names[0]!r} is [{linear.out_features}, {linear.in_features}], "
                f"got rank={rank}"
            )


def _build_layers(
    model: nn.Module,
    targets: list[tuple[nn.Linear, list[str]]],
    to_copy: list[tuple[str, nn.Module]],
    settings: dict,
) -> tuple[list[tuple[LoRALinear, list[str]]], list[tuple[str, ModuleToSave]]]:
    """One LoRALinear per target and one ModuleToSave per module to copy, all or
    none: building one freezes its layer (and init="svd" rewrites the weight), so a
    failure undoes the ones already built and restores every requires_grad flag
    before it propagates."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    built: list[tuple[LoRALinear, list[str]]] = []
    try:
        for linear, names in targets:
            built.append((LoRALinear(linear, **settings), names))
        copies = [(name, ModuleToSave(module)) for name, module in to_copy]
    except Exception:
        for lora, _ in built:
            lora.unwrap()
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    return built, copies


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Yield (name, layer) for every `LoRALinear` in `model` (each layer once)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def set_lora_enabled(model: nn.Module, flag: bool) -> None:
    """Turn every adapter of `model` on or off; off gives the base model's output.

    Disabling a merged layer unmerges it first (see `LoRALinear.enabled`); a disabled
    `ModuleToSave` runs its original module.
    """
    check_flag("flag", flag)
    for _, layer in lora_layers(model):
        layer.enabled = flag
    for _, wrapper in saved_copies(model):
        wrapper.enabled = flag


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: the base model's output inside, each layer's state restored after.

    Layers merged on entry are unmerged (disabling needs it) and stay unmerged.
    `ModuleToSave` copies are switched off too (their original modules run).
    """
    layers = [layer for _, layer in lora_layers(model)]
    layers += [wrapper for _, wrapper in saved_copies(model)]
    before = [layer.enabled for layer in layers]
    try:
        for layer in layers:
            layer.enabled = False
        yield model
    finally:
        for layer, flag in zip(layers, before, strict=True):
            layer.enabled = flag


def merge_lora(model: nn.Module, *, dequantize: bool = False) -> nn.Module:
    """Fold each adapter into its weight and put the plain `nn.Linear` back (peft's
    merge_and_unload). Disabled adapters are merged too. A `ModuleToSave` is replaced
    by its trained copy (which stays trainable), as peft does.

    A 4-bit layer (bitsandbytes `Linear4bit`) becomes, as with peft, its `Linear4bit`
    holding W + s B A quantized again with the same settings; with `dequantize=True`
    a dense `nn.Linear` in the weight's original dtype (`quant_state.dtype`) instead,
    which keeps the merge exact up to one rounding.

    All or nothing: if one merge is refused (a non-finite result), the layers merged
    so far are unmerged and the error is raised with the model unchanged.

    Returns:
        `model`, without any `LoRALinear`.
    """
    check_flag("dequantize", dequantize)
    places = lora_places(model)
    layers = list({id(layer): layer for _, layer in places}.values())
    # Dense replacements are built first; they leave their layers unchanged.
    dense = {id(layer): layer.merge_weights() for layer in layers if dequantize and layer.quantized}
    merged_here: list[tuple[LoRALinear, bool]] = []
    try:
        for layer in layers:
            if id(layer) not in dense and not layer.merged:
                was_enabled = layer.enabled
                layer.enabled = True
                merged_here.append((layer, was_enabled))
                layer.merge()
    except Exception:
        for layer, was_enabled in merged_here:
            if layer.merged:
                layer.unmerge()
            layer.enabled = was_enabled
        raise
    for name, layer in places:
        replace_module(model, name, dense.get(id(layer), layer.original_linear))
    for name, wrapper in saved_copies(model):
        replace_module(model, name, wrapper.trainable_copy)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the original `nn.Linear` layers back, adapters dropped (unmerged first, and
    an SVD residual restored), and each `ModuleToSave`'s original module, its trained
    copy dropped (peft's `unload` keeps the copy; `merge_lora` does that here). The
    restored modules stay frozen.

    Returns:
        `model`, without any `LoRALinear` or `ModuleToSave`.
    """
    places = lora_places(model)
    originals = {id(layer): layer.unwrap() for _, layer in places}
    for name, layer in places:
        replace_module(model, name, originals[id(layer)])
    for name, wrapper in saved_copies(model):
        replace_module(model, name, wrapper.original_module)
    return model


def _adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors by state_dict key: lora_A, lora_B, a learnable scaling and DoRA's
    lora_magnitude, and the parameters and persistent buffers of every ModuleToSave's
    trainable copy."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        prefix = f"{name}." if name else ""
        state[prefix + "lora_A"] = layer.lora_A
        state[prefix + "lora_B"] = layer.lora_B
        if layer.learnable_scaling:
            state[prefix + "scaling"] = layer.scaling
        if layer.use_dora:
            state[prefix + "lora_magnitude"] = layer.lora_magnitude
    for name, wrapper in saved_copies(model):
        copied = wrapper.trainable_copy.state_dict(prefix=f"{name}.trainable_copy.", keep_vars=True)
        state.update(copied)
    return state


def mark_only_lora_as_trainable(model: nn.Module) -> nn.Module:
    """Set requires_grad=True on the adapter parameters and the parameters of each
    `ModuleToSave`'s trainable copy, and False on all others.

    Returns:
        `model`.
    """
    trainable = {id(t) for t in _adapter_state(model).values() if isinstance(t, nn.Parameter)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors only, keyed as in `model.state_dict()`.

    "<module>.lora_A" [R, K], "<module>.lora_B" [N, R], for a learnable scaling
    "<module>.scaling" [] and for a DoRA layer "<module>.lora_magnitude" [N]; for each
    `ModuleToSave`, its trainable copy's state_dict ("<module>.trainable_copy.weight",
    ...). Like `state_dict()`, the tensors are
    detached views of the parameters (clone them to keep a snapshot while training
    goes on).
    """
    return {key: t.detach() for key, t in _adapter_state(model).items()}


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors from `lora_state_dict` output into `model`'s adapters.

    Strict: the keys must be exactly those of `lora_state_dict(model)`, every value a
    tensor of the parameter's shape (values are cast to the parameter's dtype and
    device). Everything is checked before anything is copied. A model whose layers are
    merged refuses (unmerge first: the merged weight holds the old adapter).

    Raises:
        ValueError: missing or unexpected keys (listed), a shape mismatch (naming the
            key and both shapes), or a merged layer.
        TypeError: a value that is not a tensor.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
    params = _adapter_state(model)
    missing = sorted(set(params) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(params))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        raise ValueError("load_lora_state_dict: " + "; ".join(parts))
    for key, param in params.items():
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] must be a tensor, got {type(value).__name__}")
        if value.shape != param.shape:
            raise ValueError(
                f"state_dict[{key!r}] has shape {list(value.shape)}, but the model's "
                f"{key} has shape {list(param.shape)}"
            )
    merged = [name for name, layer in lora_layers(model) if layer.merged]
    if merged:
        raise ValueError(
            f"load_lora_state_dict: layers {_listing(merged)} are merged; unmerge them first"
        )
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(state_dict[key])


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameter elements, shared parameters counted once."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
