"""Hypothesis budgets of the property tests, registered without a conftest.

Two profiles:

- "ci" (`make test`): few examples, derandomized, so that every run of the suite
  draws the same examples (no flaky CI; a failure reproduces as is).
- "long" (`make test-long`): many more examples, drawn afresh each run (a new part
  of the input space every time); a failure prints a `@reproduce_failure` blob and is
  replayed first on the next run from the local `.hypothesis/` database.

A property test is parametrized over `profile_params()`: its "long" case carries the
`slow` mark, so `make test` (`-m "not slow"`) runs the "ci" budget only and
`make test-long` runs both, without an environment variable.

Each backend gets its own number of examples and largest shapes (`budget`): the
Triton interpreter on CPU runs a kernel orders of magnitude slower than compiled
code, so it gets few examples with small shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(
    deadline=None,
    print_blob=True,
    # Building tensors and running the fp64 reference is slow next to what
    # hypothesis expects of a generator; that is the point of these tests.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("ci", derandomize=True, database=None, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
PROFILES = ("ci", "long")


@dataclass(frozen=True)
class Budget:
    """Examples per test and the largest sizes drawn for one backend."""

    examples: int
    max_m: int  # tokens M, all leading dims together
    max_kn: int  # in_features K and out_features N
    max_r: int  # rank R


# Compiled code (ATen, the C++ extension, Triton on a GPU) vs the Triton interpreter.
_COMPILED = {
    "ci": Budget(examples=60, max_m=300, max_kn=160, max_r=80),
    "long": Budget(examples=500, max_m=400, max_kn=300, max_r=160),
}
_INTERPRETED = {
    "ci": Budget(examples=12, max_m=40, max_kn=40, max_r=24),
    "long": Budget(examples=100, max_m=72, max_kn=72, max_r=40),
}


def budget(profile: str, backend: str, device_type: str = "cpu") -> Budget:
    """The budget of `backend` on `device_type` tensors under `profile`."""
    if backend == "triton" and device_type == "cpu":
        return _INTERPRETED[profile]
    return _COMPILED[profile]


def profile_settings(profile: str, examples: int) -> settings:
    """The registered profile with `examples` examples."""
    return settings(settings.get_profile(profile), max_examples=examples)


def profile_params() -> list:
    """pytest params "ci" and "long"; "long" is marked slow (run by `make test-long`)."""
    return [
        pytest.param("ci", id="ci"),
        pytest.param("long", id="long", marks=pytest.mark.slow),
    ]


def backend_device_params() -> list:
    """pytest params (device_type, backend): every backend on CPU tensors, and on CUDA
    tensors when there is a CUDA device; unusable ones are skips stating the reason."""
    import torch
    from helpers import usable_backends

    params = []
    for device_type in ("cpu", "cuda"):
        if device_type == "cuda" and not torch.cuda.is_available():
            params.append(
                pytest.param(
                    "cuda",
                    None,
                    id="cuda-any",
                    marks=pytest.mark.skip(reason="no CUDA device on this machine"),
                )
            )
            continue
        for param in usable_backends(device_type):
            (backend,) = param.values
            params.append(
                pytest.param(
                    device_type, backend, id=f"{device_type}-{param.id}", marks=param.marks
                )
            )
    return params
