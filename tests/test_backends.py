"""Every usable backend against the float64 reference: the output and every gradient
(x, bias, lora_A, lora_B, a learnable scaling), in every dtype the backend accepts, on
odd shapes, with and without dropout (the mask is the reference's, bit for bit, or the
gradients would miss by far more than the tolerance). Buffers start as NaN
(`poisoned_empty`), so an element a kernel never writes fails.

What is specific to one backend (its tiles, ISA builds, launch configs, layouts) is
tested in that backend's own file.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPE_IDS, check_against_reference, make_inputs, usable_backends

pytestmark = pytest.mark.usefixtures("poisoned_empty")

DEVICE_TYPES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKEND_PARAMS = [
    pytest.param(device, *param.values, id=f"{device}-{param.id}", marks=param.marks)
    for device in DEVICE_TYPES
    for param in usable_backends(device)
]
# Odd on purpose: K not a multiple of 4 (a Philox group cut by the row end) nor of any
# block size, M not a multiple of any row tile, M = 1, R = 1 and R above 16 (the split
# dB of the triton backend).
SHAPES = [(63, 70, 33, 7), (5, 70, 33, 1), (1, 16, 5, 1), (37, 131, 65, 33)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# The triton backend takes 16- and 32-bit x; the others every float dtype.
ACCEPTS = {"triton": (torch.float32, torch.bfloat16, torch.float16)}


def shape_id(shape):
    return "M{}-K{}-N{}-R{}".format(*shape)


@pytest.mark.parametrize("device_type, backend", BACKEND_PARAMS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_output_and_gradients_match_reference(device_type, backend, shape, dtype, p, bias):
    if dtype not in ACCEPTS.get(backend, DTYPES):
        pytest.skip(f"the {backend} backend does not accept {dtype} (contract)")
    M, K, N, R = shape
    inputs = make_inputs(M, K, N, R, dtype, bias=bias, learnable_s=True, device=device_type)
    check_against_reference(backend, *inputs, p)


@pytest.mark.parametrize("device_type, backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_float32_adapters_on_a_half_precision_layer(device_type, backend, dtype):
    inputs = make_inputs(
        63, 70, 33, 7, dtype, lora_dtype=torch.float32, learnable_s=True, device=device_type
    )
    check_against_reference(backend, *inputs, 0.1)


@pytest.mark.parametrize("device_type, backend", BACKEND_PARAMS)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
def test_3d_input(device_type, backend, p):
    inputs = make_inputs(
        21, 70, 33, 7, torch.float32, lead=(3,), learnable_s=True, device=device_type
    )
    check_against_reference(backend, *inputs, p)
