"""Which backend runs the op: the one place the choice is made.

Each backend name maps to a module with `availability(name)`, `serves(name,
device_type)` and `load(name)` (docs/backends.md). Modules are imported lazily, so
a broken Triton install or a C++ extension that fails to build costs only that
backend, and the reason shows in `available_backends()`.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
ENV_VAR = "LORA_KERNELS_BACKEND"

_MODULES = {
    "triton": "lora_kernels.backend_triton",
    "cuda": "lora_kernels.backend_cpp",
    "cpu": "lora_kernels.backend_cpp",
    "torch": "lora_kernels.backend_torch",
}
# Automatic choice per device type, best first.
_PREFERENCE = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

_availability: dict[str, tuple[bool, str]] = {}
_ops: dict[str, tuple] = {}
_dora_ops: dict[str, tuple | None] = {}
_warned_fallback: set[tuple[str, str]] = set()


def _module(name: str):
    return importlib.import_module(_MODULES[name])


def check_name(name: str, argument: str = "backend") -> None:
    if name not in BACKENDS:
        raise ValueError(f"{argument} must be one of {BACKENDS} or None, got {name!r}")


def availability(name: str) -> tuple[bool, str]:
    """(usable, reason) for one backend; computed once per process."""
    check_name(name)
    if name not in _availability:
        try:
            _availability[name] = _module(name).availability(name)
        except Exception as error:  # an import that fails makes the backend unusable
            _availability[name] = (False, f"{type(error).__name__}: {error}")
    return _availability[name]


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every known backend mapped to (usable on this machine, why or why not)."""
    return {name: availability(name) for name in BACKENDS}


def _serves(name: str, device_type: str) -> bool:
    return _module(name).serves(name, device_type)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _caller_stacklevel() -> int:
    """The `stacklevel` of the first frame outside lora_kernels and torch (the user's
    call, whether through lora_linear, LoRALinear or a patched peft layer)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith((_PACKAGE_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level


@torch.compiler.assume_constant_result
def resolve_backend(device_type: str, requested: str | None = None) -> str:
    """The backend name that runs tensors of `device_type`.

    `requested` (or else the LORA_KERNELS_BACKEND environment variable) names one
    explicitly; it must be usable and serve the device, or this raises with the
    reason. Otherwise the best usable backend for the device is chosen, and a
    warning says so when it is not the first preference. The chosen backend's ops
    are loaded here: torch.compile runs this function eagerly (its result is a
    constant), so the traced `backend_ops` lookup always finds them loaded.
    """
    if requested is None:
        requested = os.environ.get(ENV_VAR) or None
        argument = ENV_VAR
    else:
        argument = "backend"
    if requested is not None:
        check_name(requested, argument)
        usable, reason = availability(requested)
        if not usable:
            raise RuntimeError(f"lora_kernels backend {requested!r} is not usable: {reason}")
        if not _serves(requested, device_type):
            raise RuntimeError(
                f"lora_kernels backend {requested!r} does not run on {device_type} tensors"
            )
        backend_ops(requested)
        return requested
    preference = _PREFERENCE.get(device_type, ("torch",))
    skipped = []
    for name in preference:
        usable, reason = availability(name)
        if usable and _serves(name, device_type):
            if skipped and (device_type, name) not in _warned_fallback:
                _warned_fallback.add((device_type, name))
                warnings.warn(
                    f"lora_kernels: using the {name!r} backend for {device_type} tensors; "
                    + "; ".join(skipped),
                    stacklevel=_caller_stacklevel(),
                )
            backend_ops(name)
            return name
        skipped.append(f"{name!r} is not usable ({reason})")
    raise RuntimeError(f"no lora_kernels backend serves {device_type} tensors: {skipped}")


def backend_ops(name: str) -> tuple:
    """(forward_op, backward_op) of a usable backend, loaded once."""
    if name not in _ops:
        _ops[name] = _module(name).load(name)
    return _ops[name]


def dora_ops(name: str) -> tuple | None:
    """(dora_forward, dora_backward) of a usable backend with DoRA passes of its own
    (`load_dora`, docs/backends.md), else None: `dora_op` then composes the backend's
    plain ops."""
    if name not in _dora_ops:
        load_dora = getattr(_module(name), "load_dora", None)
        _dora_ops[name] = None if load_dora is None else load_dora(name)
    return _dora_ops[name]
