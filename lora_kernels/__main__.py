"""`python -m lora_kernels`: versions, the device, and which backends are usable and why."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .backends import available_backends, resolve_backend


def _triton_version() -> str:
    try:
        import triton
    except ImportError as error:
        return f"not installed ({error})"
    return triton.__version__


def main() -> None:
    print(f"lora_kernels {__version__}")
    print(f"python       {platform.python_version()}")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton       {_triton_version()}")
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name()}"
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, no CUDA device"
    print(f"device       {device}")
    print("backends:")
    for name, (usable, reason) in available_backends().items():
        print(f"  {name:7s} {'usable' if usable else 'not usable':11s} {reason}")
    for device_type in ("cuda", "cpu") if torch.cuda.is_available() else ("cpu",):
        print(f"default for {device_type} tensors: {resolve_backend(device_type)}")


if __name__ == "__main__":
    main()
