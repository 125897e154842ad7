"""Test-session set-up shared by every test file."""

import os

import pytest
import torch

# Without a CUDA device, Triton kernels run under the interpreter on CPU tensors.
# This must be set before triton.jit decorates anything, hence here, first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def poisoned_empty():
    """Uninitialized memory (torch.empty and at::empty, from Python or C++) comes back as
    NaN for floating-point tensors and the largest value for integer ones, so an output
    element that a kernel never writes fails the comparison. Nondeterministic ops only
    warn meanwhile."""
    import torch.utils.deterministic as det

    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        det.fill_uninitialized_memory,
    )
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    det.fill_uninitialized_memory = previous[2]


@pytest.fixture(scope="module")
def llama_4bit_dir(tmp_path_factory):
    """A saved tiny Llama whose every in_features is a multiple of bitsandbytes'
    blocksize (64; see BNB_CPU_SHAPES in test_qlora.py), for loading in 4 bits."""
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    import tiny_models
    from transformers import LlamaForCausalLM

    config = tiny_models.tiny_llama_config()
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama4bit")
    LlamaForCausalLM(config).save_pretrained(path)
    return path
