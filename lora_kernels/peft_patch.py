"""peft models run by the fused op: `patch_peft`, `unpatch_peft` and `PatchReport`.

`patch_peft` makes an existing peft model run every LoRA linear layer it can serve
through `lora_linear`, in place, without touching its module tree, parameters or
`save_pretrained`; `unpatch_peft` undoes it. peft is optional: it is imported by the
functions that need it.
"""

from __future__ import annotations

import dataclasses
import numbers
import types

import torch
from torch import nn

from .ops import autocast_operands, lora_linear
from .validation import check_backend, check_module


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
    # The op's own cast: under autocast, what autocast does to peft's three nn.Linear
    # calls for floating-point operands. Any other tensor keeps its dtype, as autocast
    # leaves it, and is then served or refused as it would be without autocast.
    x, weight, bias, A, B = autocast_operands(x, weight, bias, A, B)
    if not _dtypes_fit_op(x, weight, bias, A, B) or any(
        _has_hooks(m) for m in (base, lora_A, lora_B, dropout)
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
    """Whether `patch_peft` put the fused forward on `module`."""
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
    check_module("peft_model", peft_model)
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
    check_module("peft_model", peft_model)
    restored = []
    for name, module in peft_model.named_modules():
        if _is_patched(module):
            del module.__dict__["forward"]
            module.__dict__.pop("_lora_kernels_backend", None)
            restored.append(name)
    return restored


__all__ = ["PatchReport", "patch_peft", "unpatch_peft"]
