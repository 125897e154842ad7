"""The checks of user-facing arguments, shared by every public entry point.

Each check returns the value in its normal form (an int rank, a float alpha, ...) or
raises a TypeError (wrong kind of value) or ValueError (right kind, out of range)
whose message names the argument, says what was expected and shows what came. The
checks of tensors given to the op are `ops.py`'s; those of the backend ops are in
`contract.py`.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable

from torch import nn

from . import backends

INITS = ("kaiming", "gaussian", "svd")
# peft's spelling for "every linear layer" in target_modules.
ALL_LINEAR = "all-linear"


def check_module(name: str, value) -> nn.Module:
    """value as a torch.nn.Module, or a TypeError naming the argument."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def check_flag(name: str, value) -> bool:
    """value as a bool (not merely truthy), or a TypeError naming the argument."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_rank(rank) -> int:
    """rank as an int >= 1, or a TypeError/ValueError naming it."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int >= 1, got {rank!r} ({type(rank).__name__})")
    if rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    return int(rank)


def check_alpha(alpha) -> float:
    """alpha as a finite float > 0, or a TypeError/ValueError naming it."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(
            f"alpha must be a finite number > 0, got {alpha!r} ({type(alpha).__name__})"
        )
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    return float(alpha)


def check_dropout_p(dropout_p, name: str = "dropout_p") -> float:
    """dropout_p as a float in [0, 1), or a TypeError/ValueError naming the argument."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(
            f"{name} must be a float in [0, 1), got {dropout_p!r} ({type(dropout_p).__name__})"
        )
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def check_init(init) -> str:
    """init as one of INITS, or a ValueError naming it."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return init


def check_backend(backend) -> str | None:
    """backend as None or a known backend name, or a ValueError naming it."""
    if backend is not None:
        backends.check_name(backend)
    return backend


def module_matcher(argument: str, spec) -> Callable[[str], bool]:
    """A predicate name -> bool for target_modules / exclude_modules (peft's rules),
    or a TypeError/ValueError naming `argument`.

    None or "all-linear" matches everything; any other string is a regex that must
    match the whole name; a list/tuple/set of names matches a module whose full name
    equals an entry or ends with "." + entry.
    """
    if spec is None or spec == ALL_LINEAR:
        return lambda name: True
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as error:
            raise ValueError(f"{argument} is not a valid regex: {spec!r} ({error})") from None
        return lambda name: pattern.fullmatch(name) is not None
    if isinstance(spec, (list, tuple, set, frozenset)):
        entries = list(spec)
        for entry in entries:
            if not isinstance(entry, str) or not entry:
                raise TypeError(
                    f"{argument} entries must be non-empty module names (str), got {entry!r}"
                )
        return lambda name: any(name == e or name.endswith("." + e) for e in entries)
    raise TypeError(
        f"{argument} must be None, {ALL_LINEAR!r}, a regex string or a list of module "
        f"names, got {spec!r} ({type(spec).__name__})"
    )
