"""Test-session set-up shared by every test file."""

import os

import torch

# Without a CUDA device, Triton kernels run under the interpreter on CPU tensors.
# This must be set before triton.jit decorates anything, hence here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
