"""peft models run by the fused op: `patch_peft`, `unpatch_peft` and `PatchReport`.

`patch_peft` makes an existing peft model run every LoRA linear layer it can serve
through `lora_linear` (peft's DoRA adapters through `dora_linear`), in place: each such
peft `lora.Linear` gets the class `PatchedLoraLinear`, a subclass of peft's whose only
changes are `forward`, and `merge`/`unmerge` that run peft's and then drop the DoRA
weight-norm caches. Its module tree, parameters, state dict, hooks and
`save_pretrained` are untouched; since the forward lives on the class, not on the
instance, pickles, copies and data-parallel replicas of a patched module run their own
weights. `unpatch_peft` gives the modules
peft's class back. peft is optional: it is imported by the functions that need it, and
by the first lookup of `PatchedLoraLinear` (which is where pickle finds it).
"""

from __future__ import annotations

import collections
import dataclasses
import numbers
import sys
import threading

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from . import dora
from .ops import autocast_operands, dora_linear, lora_linear
from .validation import check_backend, check_module

PATCHED_CLASS_NAME = "PatchedLoraLinear"
PATCHED_4BIT_CLASS_NAME = "PatchedLoraLinear4bit"
# Instance attributes patch_peft adds, all removed by unpatch_peft.
_BACKEND_ATTR = "_lora_kernels_backend"
_CALLS_ATTR = "_lora_kernels_calls"
# A forward found on the instance that is the module's own bound peft forward (left by
# accelerate's remove_hook_from_module, for one): kept here while patched.
_STASHED_FORWARD_ATTR = "_lora_kernels_instance_forward"
# adapter -> dora.WeightNormCache, for the DoRA adapters served. Pickles and deep copies
# carry empty caches (WeightNormCache pickles empty); data-parallel replicas, which
# share the original's instance attributes and have weights of their own, use none.
_NORM_CACHES_ATTR = "_lora_kernels_norm_caches"
_EXAMPLES = 3

_patched_class_lock = threading.Lock()


def _require_peft():
    """peft's lora layer module, or an ImportError saying how to install peft."""
    try:
        from peft.tuners.lora import layer as peft_lora_layer
    except ImportError as error:
        raise ImportError(
            "patch_peft and unpatch_peft work on models built by peft; install it with "
            "`pip install peft`"
        ) from error
    return peft_lora_layer


@dataclasses.dataclass
class CallCounts:
    """Calls of the modules one `patch_peft` patched: how many ran the fused op (`dora`
    of them DoRA adapters run by `dora_linear`), and why the others went to peft's
    forward. Counted in eager mode only (code traced by
    torch.compile is not counted: a Python counter there would cost recompiles).
    A deep copy or an unpickled copy of the model counts apart, in its own copy;
    `nn.DataParallel` replicas count here (without a lock: a diagnostic, not exact
    under threads)."""

    fused: int = 0
    dora: int = 0
    by_peft: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, reason: str | None, is_dora: bool = False) -> None:
        if reason is None:
            self.fused += 1
            self.dora += is_dora
        else:
            self.by_peft[reason] += 1

    def reset(self) -> None:
        self.fused = self.dora = 0
        self.by_peft.clear()


def _grouped(entries: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(reason, names) pairs, the most frequent reason first."""
    groups: dict[str, list[str]] = {}
    for name, why in entries.items():
        groups.setdefault(why, []).append(name)
    return sorted(groups.items(), key=lambda item: -len(item[1]))


def _group_lines(entries: dict[str, str]) -> list[str]:
    lines = []
    for why, names in _grouped(entries):
        examples = ", ".join(names[:_EXAMPLES])
        more = f" and {len(names) - _EXAMPLES} more" if len(names) > _EXAMPLES else ""
        lines.append(f"    {len(names)} x {why}: {examples}{more}")
    return lines


@dataclasses.dataclass
class PatchReport:
    """What `patch_peft` did, and (in `calls`) what the patched modules did since.

    Attributes:
        patched: names of the peft `lora.Linear` modules that are now `PatchedLoraLinear`
            and run `lora_linear` when a call can be served (see `patch_peft`).
        not_patched: name -> why, for every other peft LoRA module (they keep peft's
            forward, or the forward someone else installed). `str(report)` groups them
            by reason.
        adapters_not_served: "name [adapter]" -> why, for adapters of patched modules
            that peft's own forward serves when they are active (lora_bias, other LoRA
            variants, ...).
        dora_served: "name [adapter]" of the DoRA adapters of patched modules, which
            run `dora_linear` when they are active.
        calls: calls of the patched modules since patching (eager mode): how many ran
            the fused op, and why the others went to peft's forward. `calls.reset()`
            starts a new count.
    """

    patched: list[str] = dataclasses.field(default_factory=list)
    not_patched: dict[str, str] = dataclasses.field(default_factory=dict)
    adapters_not_served: dict[str, str] = dataclasses.field(default_factory=dict)
    dora_served: list[str] = dataclasses.field(default_factory=list)
    calls: CallCounts = dataclasses.field(default_factory=CallCounts)

    def __str__(self) -> str:
        lines = [f"patch_peft: {len(self.patched)} lora.Linear module(s) run the fused op"]
        if self.dora_served:
            lines.append(f"  DoRA: {len(self.dora_served)} adapter(s) run dora_linear")
        if self.not_patched:
            lines.append(f"  not patched, {len(self.not_patched)} module(s):")
            lines += _group_lines(self.not_patched)
        if self.adapters_not_served:
            lines.append(
                f"  served by peft when active, {len(self.adapters_not_served)} adapter(s):"
            )
            lines += _group_lines(self.adapters_not_served)
        by_peft = sum(self.calls.by_peft.values())
        if self.calls.fused or by_peft:
            dora_calls = f" ({self.calls.dora} DoRA)" if self.calls.dora else ""
            lines.append(
                f"  calls since patching: {self.calls.fused} fused{dora_calls}, {by_peft} by peft"
            )
            for why, count in self.calls.by_peft.most_common():
                lines.append(f"    {count} x {why}")
        return "\n".join(lines)


def _peft_dora_classes() -> tuple[type, type] | None:
    """peft's (DoraLinearVariant, DoraLinearLayer), or None for a peft without them."""
    try:
        from peft.tuners.lora import dora as peft_dora
        from peft.tuners.lora import variants
    except ImportError:
        return None
    return variants.DoraLinearVariant, peft_dora.DoraLinearLayer


def _dora_magnitude_layer(module, adapter: str):
    """peft's DoraLinearLayer of `adapter` when the adapter is peft's own DoRA (its
    classes, not subclasses), which `dora_linear` computes; else None."""
    classes = _peft_dora_classes()
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if classes is None or type(variant) is not classes[0]:
        return None
    layers = getattr(module, "lora_magnitude_vector", None)
    layer = layers[adapter] if layers is not None and adapter in layers else None
    return layer if type(layer) is classes[1] else None


def _adapter_problem(module, adapter: str) -> str | None:
    """Why `adapter` of a peft lora.Linear cannot run the fused op, or None."""
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None and _dora_magnitude_layer(module, adapter) is None:
        return f"LoRA variant {type(variant).__name__} (not peft's own DoRA)"
    if getattr(module, "lora_bias", {}).get(adapter, False):
        return "lora_bias=True"
    dropout = module.lora_dropout[adapter]
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"lora_dropout is a {type(dropout).__name__}, not nn.Dropout or nn.Identity"
    return None


def _describe(function) -> str:
    """A callable's name for a report: Class.method, a function's qualified name."""
    owner = getattr(function, "__self__", None)
    func = getattr(function, "__func__", function)
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    if owner is not None and not name.startswith(type(owner).__qualname__ + "."):
        name = f"{type(owner).__qualname__}.{name}"
    module = getattr(func, "__module__", None) or type(function).__module__
    return f"{module}.{name}"


def _foreign_forward_problem(module, peft_linear) -> str | None:
    """Why a forward installed on the module by someone else keeps it from being
    patched, or None (no such forward, or the module's own bound peft forward)."""
    if getattr(module, "_hf_hook", None) is not None:
        return (
            f"accelerate's add_hook_to_module ({type(module._hf_hook).__name__}) wraps its "
            "forward: left to the hook and peft"
        )
    forward = module.__dict__.get("forward")
    if forward is None or _is_own_peft_forward(module, forward, peft_linear):
        return None
    return (
        f"its forward was replaced on the instance by {_describe(forward)} (X-LoRA or "
        "another library): left to it"
    )


def _is_own_peft_forward(module, forward, peft_linear) -> bool:
    """Whether `forward` is peft's lora.Linear.forward bound to `module`: the very
    computation the class's forward does."""
    return getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) in (
        peft_linear.forward,
        _fused_forward,
    )


def _class_forward_problem(peft_linear) -> str | None:
    """Why peft's lora.Linear.forward is not peft's own code (someone replaced it on the
    class), or None."""
    forward = peft_linear.__dict__.get("forward")
    own = (
        forward is not None
        and getattr(forward, "__module__", None) == peft_linear.__module__
        and getattr(forward, "__qualname__", None) == f"{peft_linear.__qualname__}.forward"
        and not hasattr(forward, "__wrapped__")
    )
    if own:
        return None
    return (
        f"peft's lora.Linear.forward was replaced on the class by {_describe(forward)}: left to it"
    )


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
    return _foreign_forward_problem(module, peft_linear)


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling `module` runs more than its forward (hooks, accelerate's _hf_hook)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or getattr(module, "_hf_hook", None) is not None
    )


def _has_global_hooks() -> bool:
    """Whether hooks registered for every module (register_module_forward_hook and the
    like: module trackers, FLOP counters) would see peft's submodule calls."""
    return any(
        getattr(torch_module, name, None)
        for name in (
            "_global_forward_hooks",
            "_global_forward_pre_hooks",
            "_global_backward_hooks",
            "_global_backward_pre_hooks",
        )
    )


def _is_plain(t: torch.Tensor | None) -> bool:
    """None or a plain tensor/parameter (no subclass such as DTensor or a quantized one)."""
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def _dtypes_fit_op(x, weight, bias, A, B) -> bool:
    """Whether lora_linear's checks take these dtypes: W and b in x's dtype, A and B
    sharing one, x's or float32."""
    # Not accumulation_dtype(x.dtype): the op takes float32 adapters with float64 x too.
    return (
        weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and A.dtype == B.dtype
        and A.dtype in (x.dtype, torch.float32)
    )


def _norm_cache(module, adapter: str) -> dora.WeightNormCache | None:
    """The module's cache of ||W_n||^2 for a DoRA adapter; None in a data-parallel
    replica (rebuilt every step, and sharing the original's instance attributes)."""
    if getattr(module, "_is_replica", False):
        return None
    return module.__dict__.get(_NORM_CACHES_ATTR, {}).get(adapter)


def _clear_norm_caches(module) -> None:
    for cache in module.__dict__.get(_NORM_CACHES_ATTR, {}).values():
        cache.clear()


def _served_adapter(module, args, kwargs, check_cast_input: bool) -> tuple[str, str | None]:
    """The one adapter a patched module's call would run, or why peft's forward serves
    the call: the rules both patched classes share (extra forward arguments, disabled or
    merged adapters, not exactly one active adapter, the adapter's own settings). peft's
    plain Linear honours `cast_input_dtype_enabled`; its 4-bit layer has no such switch."""
    if args or any(k != "adapter_names" or v is not None for k, v in kwargs.items()):
        return "", "extra forward arguments (adapter_names, ...)"
    if module.disable_adapters:
        return "", "adapters disabled"
    if module.merged:
        return "", "adapters merged"
    if check_cast_input and not getattr(module, "cast_input_dtype_enabled", True):
        return "", "cast_input_dtype disabled"
    active = [a for a in module.active_adapters if a in module.lora_A]
    if len(active) != 1:
        return "", "several active adapters" if active else "no active adapter on the module"
    return active[0], _adapter_problem(module, active[0])


def _fused_call(module, x, args, kwargs) -> dict | str:
    """lora_linear's (for DoRA, dora_linear's: with "magnitude") arguments for this call
    of a patched module, or why peft's forward serves it (a reason, as counted in
    `CallCounts.by_peft`)."""
    adapter, problem = _served_adapter(module, args, kwargs, check_cast_input=True)
    if problem is not None:
        return problem
    base = module.base_layer
    lora_A = module.lora_A[adapter]
    lora_B = module.lora_B[adapter]
    dropout = module.lora_dropout[adapter]
    magnitude_layer = _dora_magnitude_layer(module, adapter)
    weight, bias = base.weight, base.bias
    A, B = lora_A.weight, lora_B.weight
    magnitude = None if magnitude_layer is None else magnitude_layer.weight
    if not isinstance(x, torch.Tensor):
        return f"input is a {type(x).__name__}, not a tensor"
    if not all(_is_plain(t) for t in (x, weight, bias, A, B, magnitude)):
        return "a tensor subclass (DTensor, quantized, ...) among x and the weights"
    # The op's own cast: under autocast, what autocast does to peft's three nn.Linear
    # calls for floating-point operands. Any other tensor keeps its dtype, as autocast
    # leaves it, and is then served or refused as it would be without autocast.
    x, weight, bias, A, B, magnitude = autocast_operands(x, weight, bias, A, B, magnitude)
    if not _dtypes_fit_op(x, weight, bias, A, B):
        return (
            f"dtypes the op does not take (x {x.dtype}, weight {weight.dtype}, "
            f"lora_A {A.dtype}, lora_B {B.dtype})"
        )
    if magnitude is not None and (magnitude.dtype != A.dtype or magnitude.device != x.device):
        return (
            f"DoRA magnitude of dtype {magnitude.dtype} on {magnitude.device}, not lora_A's "
            f"dtype {A.dtype} on x's device {x.device}"
        )
    if any(_has_hooks(m) for m in (base, lora_A, lora_B, dropout)):
        return "hooks on base_layer, lora_A, lora_B or lora_dropout"
    if magnitude_layer is not None and _has_hooks(magnitude_layer):
        return "hooks on lora_magnitude_vector"
    if _has_global_hooks():
        return "global module hooks (torch.nn.modules.module.register_module_*_hook)"
    if isinstance(dropout, nn.Dropout):
        p, training = dropout.p, dropout.training
        if not 0.0 <= p < 1.0:
            return f"lora_dropout p={p}, outside [0, 1)"
        # peft's DoRA drops the input only while the layer itself is training too.
        training = training and (magnitude is None or module.training)
    else:
        p, training = 0.0, False
    scaling = module.scaling[adapter]
    if isinstance(scaling, bool) or not isinstance(scaling, (numbers.Real, torch.Tensor)):
        return f"scaling is a {type(scaling).__name__}"
    if magnitude is not None:
        return {
            "x": x,
            "weight": weight,
            "bias": bias,
            "lora_A": A,
            "lora_B": B,
            "magnitude": magnitude,
            "scaling": scaling,
            "dropout_p": p,
            "training": training,
            "backend": module.__dict__.get(_BACKEND_ATTR),
            "norm_cache": _norm_cache(module, adapter),
        }
    return {
        "x": x,
        "weight": weight,
        "bias": bias,
        "lora_A": A,
        "lora_B": B,
        "scaling": scaling,
        "dropout_p": p,
        "training": training,
        "backend": module.__dict__.get(_BACKEND_ATTR),
    }


def _count(module, reason: str | None, is_dora: bool = False) -> None:
    if torch.compiler.is_compiling():
        return
    calls = module.__dict__.get(_CALLS_ATTR)
    if calls is not None:
        calls.add(reason, is_dora)


def _fused_forward(self, x, *args, **kwargs):
    """PatchedLoraLinear.forward: peft's lora.Linear.forward, with the one-active-adapter
    case run by lora_linear (dora_linear for peft's DoRA).

    Anything else (disabled or merged adapters, several or no active adapters,
    adapter_names or other extra arguments, variants other than DoRA, lora_bias, dtypes
    the op does not take, hooks on the submodules or global module hooks, sharded
    tensors) goes to peft's own forward.
    """
    peft_class = getattr(type(self), "_lora_kernels_peft_class", None)
    if peft_class is None:
        # A bound method taken while patched, called after unpatch_peft: the module's
        # own class serves it.
        return type(self).forward(self, x, *args, **kwargs)
    call = _fused_call(self, x, args, kwargs)
    if isinstance(call, str):
        _count(self, call)
        return peft_class.forward(self, x, *args, **kwargs)
    if "magnitude" in call:
        _count(self, None, is_dora=True)
        return dora_linear(**call)
    _count(self, None)
    return lora_linear(**call)


def _merge(self, *args, **kwargs):
    """PatchedLoraLinear.merge: peft's; the DoRA norm caches are dropped, since peft
    swaps the weight's storage (`weight.data = ...`), which bumps no version counter
    and may land at the old address."""
    try:
        return _peft_class_of(self).merge(self, *args, **kwargs)
    finally:
        _clear_norm_caches(self)


def _unmerge(self, *args, **kwargs):
    """PatchedLoraLinear.unmerge: peft's, the DoRA norm caches dropped as in merge."""
    try:
        return _peft_class_of(self).unmerge(self, *args, **kwargs)
    finally:
        _clear_norm_caches(self)


def _peft_class_of(module) -> type:
    """peft's class of a patched module (the module's own class after unpatch_peft)."""
    return getattr(type(module), "_lora_kernels_peft_class", type(module))


def _peft_class_name(self) -> str:
    """nn.Module's name in repr: peft's class name, so a patched model prints as before."""
    return self._lora_kernels_peft_class.__name__


def _patched_class() -> type:
    """`PatchedLoraLinear`, peft's lora.Linear with the fused forward; created once, and
    kept as this module's attribute so that pickle finds it by its qualified name."""
    patched = globals().get(PATCHED_CLASS_NAME)
    if patched is not None:
        return patched
    peft_linear = _require_peft().Linear
    with _patched_class_lock:
        patched = globals().get(PATCHED_CLASS_NAME)
        if patched is None:
            namespace = {
                "__module__": __name__,
                "__qualname__": PATCHED_CLASS_NAME,
                "__doc__": "peft's lora.Linear, run by lora_kernels' fused op (patch_peft).",
                "forward": _fused_forward,
                "merge": _merge,
                "unmerge": _unmerge,
                "_get_name": _peft_class_name,
                "_lora_kernels_peft_class": peft_linear,
            }
            patched = type(peft_linear)(PATCHED_CLASS_NAME, (peft_linear,), namespace)
            globals()[PATCHED_CLASS_NAME] = patched
    return patched


# ---------------------------------------------------------------------------------------
# peft's 4-bit layer (lora.bnb.Linear4bit over a bitsandbytes Linear4bit)
# ---------------------------------------------------------------------------------------


def _peft_linear4bit():
    """peft's lora.bnb.Linear4bit, or None (bitsandbytes never imported: no 4-bit layer
    can exist, and bitsandbytes stays unimported)."""
    if "bitsandbytes" not in sys.modules:
        return None
    try:
        from peft.tuners.lora import bnb as peft_bnb
    except ImportError:
        return None
    return getattr(peft_bnb, "Linear4bit", None)


def _module_problem_4bit(module, peft_4bit) -> str | None:
    """Why a peft lora.bnb.Linear4bit cannot run the fused op at all, or None."""
    from .quant4bit import is_4bit_weight

    base = module.base_layer
    if not is_4bit_weight(getattr(base, "weight", None)):
        return f"its base layer is a {type(base).__name__} without a bitsandbytes 4-bit weight"
    quant_state = getattr(base.weight, "quant_state", None) or getattr(base, "quant_state", None)
    if quant_state is None:
        return "its 4-bit weight has no quant_state"
    if len(quant_state.shape) != 2:
        return "its 4-bit weight's quant_state.shape is not 2-D"
    return _foreign_forward_problem(module, peft_4bit)


def _fused_call_4bit(module, x, args, kwargs) -> dict | str:
    """linear4bit_forward's arguments for this call of a patched 4-bit module, or why
    peft's forward serves it (the same rules as `_fused_call`, but for the weight)."""
    adapter, problem = _served_adapter(module, args, kwargs, check_cast_input=False)
    if problem is not None:
        return problem
    base = module.base_layer
    lora_A, lora_B = module.lora_A[adapter], module.lora_B[adapter]
    dropout = module.lora_dropout[adapter]
    A, B = lora_A.weight, lora_B.weight
    magnitude_layer = _dora_magnitude_layer(module, adapter)
    magnitude = None if magnitude_layer is None else magnitude_layer.weight
    if not isinstance(x, torch.Tensor):
        return f"input is a {type(x).__name__}, not a tensor"
    if not all(_is_plain(t) for t in (x, base.bias, A, B, magnitude)):
        return "a tensor subclass (DTensor, ...) among x, the bias and the adapters"
    if torch.is_autocast_enabled(x.device.type):
        return "torch.autocast (peft's 4-bit layer skips its casts under autocast)"
    compute = base.compute_dtype if base.compute_dtype is not None else x.dtype
    if not (A.dtype == B.dtype and A.dtype in (compute, torch.float32)):
        return (
            f"dtypes the op does not take (compute {compute}, lora_A {A.dtype}, lora_B {B.dtype})"
        )
    if compute == torch.float64 or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"x of {x.dtype} or compute dtype {compute} (the 4-bit op takes 16/32-bit floats)"
    if magnitude is not None and (magnitude.dtype != A.dtype or magnitude.device != x.device):
        return (
            f"DoRA magnitude of dtype {magnitude.dtype} on {magnitude.device}, not lora_A's "
            f"dtype {A.dtype} on x's device {x.device}"
        )
    if any(_has_hooks(m) for m in (base, lora_A, lora_B, dropout)):
        return "hooks on base_layer, lora_A, lora_B or lora_dropout"
    if magnitude_layer is not None and _has_hooks(magnitude_layer):
        return "hooks on lora_magnitude_vector"
    if _has_global_hooks():
        return "global module hooks (torch.nn.modules.module.register_module_*_hook)"
    if isinstance(dropout, nn.Dropout):
        p, training = dropout.p, dropout.training
        if not 0.0 <= p < 1.0:
            return f"lora_dropout p={p}, outside [0, 1)"
        # peft's DoRA drops the input only while the layer itself is training too.
        training = training and (magnitude is None or module.training)
    else:
        p, training = 0.0, False
    scaling = module.scaling[adapter]
    if isinstance(scaling, bool) or not isinstance(scaling, (numbers.Real, torch.Tensor)):
        return f"scaling is a {type(scaling).__name__}"
    call = {
        "base": base,
        "x": x,
        "lora_A": A,
        "lora_B": B,
        "scaling": scaling,
        "dropout_p": p,
        "training": training,
        "backend": module.__dict__.get(_BACKEND_ATTR),
    }
    if magnitude is not None:
        call.update(magnitude=magnitude, norm_cache=_norm_cache(module, adapter))
    return call


def _fused_forward_4bit(self, x, *args, **kwargs):
    """PatchedLoraLinear4bit.forward: peft's lora.bnb.Linear4bit.forward, with the
    one-active-adapter case run by `qlora_op.linear4bit_forward` (what LoRALinear runs
    for a Linear4bit base, DoRA adapters included); anything else goes to peft's
    forward, as `_fused_forward`."""
    from .qlora_op import linear4bit_forward

    peft_class = getattr(type(self), "_lora_kernels_peft_class", None)
    if peft_class is None:
        return type(self).forward(self, x, *args, **kwargs)
    call = _fused_call_4bit(self, x, args, kwargs)
    if isinstance(call, str):
        _count(self, call)
        return peft_class.forward(self, x, *args, **kwargs)
    _count(self, None, is_dora="magnitude" in call)
    return linear4bit_forward(**call)


def _patched_4bit_class(peft_4bit) -> type:
    """`PatchedLoraLinear4bit`, peft's lora.bnb.Linear4bit with the fused forward;
    created once and kept as this module's attribute, for pickle."""
    patched = globals().get(PATCHED_4BIT_CLASS_NAME)
    if patched is not None:
        return patched
    with _patched_class_lock:
        patched = globals().get(PATCHED_4BIT_CLASS_NAME)
        if patched is None:
            namespace = {
                "__module__": __name__,
                "__qualname__": PATCHED_4BIT_CLASS_NAME,
                "__doc__": "peft's lora.bnb.Linear4bit, run by lora_kernels' fused op.",
                "forward": _fused_forward_4bit,
                "merge": _merge,
                "unmerge": _unmerge,
                "_get_name": _peft_class_name,
                "_lora_kernels_peft_class": peft_4bit,
            }
            patched = type(peft_4bit)(PATCHED_4BIT_CLASS_NAME, (peft_4bit,), namespace)
            globals()[PATCHED_4BIT_CLASS_NAME] = patched
    return patched


def _patch_plan_4bit(module, peft_4bit) -> tuple[type, str | None] | None:
    """(patched class, problem) for a peft 4-bit layer or one patched before; None for
    any other module."""
    if peft_4bit is None:
        return None
    patched = _patched_4bit_class(peft_4bit)
    if type(module) is patched:
        return patched, _foreign_forward_problem(module, peft_4bit)
    if type(module) is not peft_4bit:
        return None
    problem = _class_forward_problem(peft_4bit) or _module_problem_4bit(module, peft_4bit)
    return patched, problem


def __getattr__(name: str):
    # PatchedLoraLinear is made on first use: it subclasses peft's class, and peft is
    # optional. Unpickling a patched model looks it up here.
    if name == PATCHED_CLASS_NAME:
        return _patched_class()
    if name == PATCHED_4BIT_CLASS_NAME:
        import bitsandbytes  # noqa: F401 (a pickled 4-bit layer needs it anyway)

        return _patched_4bit_class(_peft_linear4bit())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_patched(module: nn.Module) -> bool:
    """Whether `patch_peft` made `module` a PatchedLoraLinear (or its 4-bit twin)."""
    return type(module) in (
        globals().get(PATCHED_CLASS_NAME),
        globals().get(PATCHED_4BIT_CLASS_NAME),
    )


def patch_peft(peft_model: nn.Module, backend: str | None = None) -> PatchReport:
    """Make every peft `lora.Linear` of `peft_model` that can be served run `lora_linear`.

    In place and reversible (`unpatch_peft`): each module served becomes a
    `PatchedLoraLinear` (`module.__class__` is swapped for a subclass of peft's
    lora.Linear whose changes are `forward`, and `merge`/`unmerge` that drop the DoRA
    norm caches after peft's own); the module tree, the parameter names,
    the state dict, the hooks and `save_pretrained` are untouched, and `isinstance`
    checks against peft's class still hold. A patched module computes, for x [*, K],
    base weight W [N, K], bias b [N] or None, active adapter lora_A.weight [R, K],
    lora_B.weight [N, R], scaling s and lora_dropout p (0 for nn.Identity; applied only
    while the dropout module is in training mode, as peft's nn.Dropout):

        Y = X W^T + b + s * (dropout(X) A^T) B^T       [*, N] in x's dtype

    which is what peft computes (peft casts X to the adapter dtype for the branch; the
    fused op takes float32 adapters with half-precision X directly). A DoRA adapter
    (peft's `use_dora=True`: DoraLinearVariant, magnitude m =
    `lora_magnitude_vector[adapter].weight` [N]) runs `dora_linear`, peft's formula:
    Y = (m/n) (X W^T + s X A^T B^T) + b with n = ||W + s B A|| per row, detached, and
    while the layer and its nn.Dropout are training Y = X W^T + b + (m/n - 1) D(X) W^T
    + (m/n) s D(X) A^T B^T (the base on the undropped X, as peft); each patched module
    keeps a `dora.WeightNormCache` per DoRA adapter (||W_n||^2 of the frozen W). The
    dropout mask
    differs from peft's (it is the op's Philox mask, seeded from torch's default
    generator), with the same distribution. A call goes to peft's own forward when
    adapters are disabled or merged, when not exactly one active adapter is present,
    with `adapter_names` or other extra arguments, for a LoRA variant other than
    peft's DoRA or lora_bias, when a submodule has hooks or global module hooks are
    registered, or
    when the dtypes do not fit the op, so those behave exactly as in peft;
    `report.calls` counts the calls of each kind.

    A forward that someone else installed is never replaced: a module whose forward was
    set on the instance (X-LoRA, accelerate's `add_hook_to_module`) or whose class's
    forward is not peft's own is left as it is and reported, unless that forward is the
    module's own bound peft forward (the same computation). Hooks registered on the
    module itself keep running around the fused forward. Because dispatch goes through
    the class, pickles and `torch.save` of a patched model load patched (lora_kernels
    and peft must be importable there; unpatch first for a pickle without
    lora_kernels), and `copy.copy`, `copy.deepcopy` and `nn.DataParallel`'s replicas
    run their own weights.

    Calling it again on a patched model re-patches the same modules with the new
    backend and a new report.

    peft's 4-bit layers (`lora.bnb.Linear4bit` over a bitsandbytes `Linear4bit`)
    become `PatchedLoraLinear4bit` under the same rules, and run what `LoRALinear` runs
    for a 4-bit base (`qlora_op.linear4bit_forward`: the base's compute dtype, W
    dequantized into the shared workspace, never saved; a DoRA adapter by `dora_linear`
    over the 4-bit weight, QDoRA); under torch.autocast they go to peft's forward.

    Args:
        peft_model: a `peft.PeftModel`, a `LoraModel`, or any module holding peft LoRA
            layers.
        backend: passed to `lora_linear` (None: the automatic choice).

    Raises:
        ImportError: peft is not installed.
        ValueError: the model holds no peft LoRA layer, or an unknown backend.

    Returns:
        a `PatchReport`: the patched modules, why the others were not, and call counts.
    """
    peft_lora_layer = _require_peft()
    check_module("peft_model", peft_model)
    check_backend(backend)
    patched_class = _patched_class()
    peft_linear = peft_lora_layer.Linear
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
    class_problem = _class_forward_problem(peft_linear)
    peft_4bit = _peft_linear4bit()
    for name, module in lora_modules:
        target_class = patched_class
        already_patched = type(module) is patched_class
        plan_4bit = _patch_plan_4bit(module, peft_4bit)
        if plan_4bit is not None:
            target_class, problem = plan_4bit
            already_patched = type(module) is target_class
        elif already_patched:
            # A forward set on the instance since the first patch_peft runs instead.
            problem = _foreign_forward_problem(module, peft_linear)
        elif type(module) is peft_linear and class_problem is not None:
            problem = class_problem
        else:
            problem = _module_problem(module, peft_linear)
        if problem is None:
            adapters = {a: _adapter_problem(module, a) for a in module.lora_A}
            if adapters and all(why is not None for why in adapters.values()):
                problem = "; ".join(f"adapter {a!r}: {why}" for a, why in adapters.items())
            elif not adapters:
                problem = "no LoRA adapter on this module"
        if problem is not None:
            if already_patched:
                _unpatch_module(module)
            report.not_patched[name] = problem
            continue
        caches = {}
        for adapter, why in adapters.items():
            if why is not None:
                report.adapters_not_served[f"{name} [{adapter}]"] = why
            elif _dora_magnitude_layer(module, adapter) is not None:
                report.dora_served.append(f"{name} [{adapter}]")
                caches[adapter] = dora.WeightNormCache()
        if not already_patched:
            forward = module.__dict__.pop("forward", None)
            if forward is not None:  # the module's own bound peft forward
                module.__dict__[_STASHED_FORWARD_ATTR] = forward
            module.__class__ = target_class
        module.__dict__[_BACKEND_ATTR] = backend
        module.__dict__[_CALLS_ATTR] = report.calls
        if caches:
            module.__dict__[_NORM_CACHES_ATTR] = caches
        else:
            module.__dict__.pop(_NORM_CACHES_ATTR, None)
        report.patched.append(name)
    return report


def _unpatch_module(module: nn.Module) -> None:
    """Give one PatchedLoraLinear peft's class back, with what it had on the instance."""
    module.__class__ = type(module)._lora_kernels_peft_class
    module.__dict__.pop(_BACKEND_ATTR, None)
    module.__dict__.pop(_CALLS_ATTR, None)
    module.__dict__.pop(_NORM_CACHES_ATTR, None)
    forward = module.__dict__.pop(_STASHED_FORWARD_ATTR, None)
    if forward is not None:
        module.__dict__["forward"] = forward


def unpatch_peft(peft_model: nn.Module) -> list[str]:
    """Give every module patched by `patch_peft` peft's class back, and exactly the
    instance attributes it had before.

    Returns:
        the names of the modules restored (empty if none was patched).
    """
    check_module("peft_model", peft_model)
    restored = []
    for name, module in peft_model.named_modules():
        if _is_patched(module):
            _unpatch_module(module)
            restored.append(name)
    return restored


__all__ = ["CallCounts", "PatchReport", "patch_peft", "unpatch_peft"]
