"""`lora_kernels.dequantize_4bit` against bitsandbytes, bit for bit, on every backend.

bitsandbytes quantizes a random weight (nf4 / fp4, blocksizes 64-256, double
quantization on and off, quant_storage uint8 and bf16, dense dtype fp32 / bf16 / fp16);
`bitsandbytes.functional.dequantize_4bit` gives the expected bits. Shapes have K not a
multiple of the blocksize, so blocks span rows. Without CUDA the Triton kernel runs on
CPU tensors under TRITON_INTERPRET=1 (set here before anything imports Triton, as in
test_backend_triton.py). Buffers lora_kernels allocates are poisoned with NaN.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DTYPE_IDS

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import lora_kernels  # noqa: E402
from lora_kernels import backends, quant4bit  # noqa: E402

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
import bitsandbytes.functional as bnbF  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("poisoned_empty")


def _triton_device() -> tuple[torch.device | None, str]:
    """(the device the Triton kernel runs on here, or None; why not)."""
    usable, why = backends.availability("triton")
    if not usable:
        return None, why
    from lora_kernels.backend_triton import interpreter

    return torch.device("cpu" if interpreter.ACTIVE else "cuda"), ""


TRITON_DEVICE, TRITON_WHY = _triton_device()
CPU_USABLE, CPU_WHY = backends.availability("cpu")
CUDA_USABLE, CUDA_WHY = backends.availability("cuda")
# The reference runs where bitsandbytes' own kernels do: on CUDA when there is a GPU.
TORCH_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STORAGE_IDS = {torch.uint8: "u8", torch.bfloat16: "bf16-storage"}


@pytest.fixture(params=["torch", "triton", "cuda", "cpu-avx512", "cpu-avx2", "cpu-baseline"])
def backend(request):
    """The backend name a test passes; the C++ kernel once per CPU build this CPU runs."""
    name = request.param
    if name == "triton" and TRITON_DEVICE is None:
        pytest.skip(f"triton: {TRITON_WHY}")
    if name == "cuda" and not CUDA_USABLE:
        pytest.skip(f"backend 'cuda' is not usable: {CUDA_WHY}")
    if not name.startswith("cpu-"):
        yield name
        return
    if not CPU_USABLE:
        pytest.skip(f"backend 'cpu' is not usable: {CPU_WHY}")
    from lora_kernels import backend_cpp

    isa = name.removeprefix("cpu-")
    chosen = backend_cpp.cpu_isa(isa)
    if chosen != isa:
        backend_cpp.cpu_isa("auto")
        pytest.skip(f"this CPU does not support the {isa} build (using {chosen})")
    yield "cpu"
    backend_cpp.cpu_isa("auto")


def device_of(backend: str) -> torch.device:
    devices = {"triton": TRITON_DEVICE, "cuda": torch.device("cuda"), "cpu": torch.device("cpu")}
    return devices.get(backend, TORCH_DEVICE)


def quantize(N, K, dtype, quant_type, blocksize, nested, storage, device, seed=0):
    """(packed, quant_state) of a random [N, K] weight, quantized by bitsandbytes."""
    g = torch.Generator().manual_seed(seed + 1000 * N + K)
    w = (torch.randn(N, K, generator=g, dtype=torch.float64) * K**-0.5).to(dtype).to(device)
    return bnbF.quantize_4bit(
        w,
        blocksize=blocksize,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
    )


def bnb_writes_positive_zero(device: torch.device, K: int) -> bool:
    """Whether bitsandbytes' dequantize writes +0.0 for fp4's code 8 (sign bit alone).

    Its CUDA and C++ CPU kernels decode it as -0.0, as lora_kernels does; on the CPU, for
    odd K, it falls back to a PyTorch table that lists the entry as the int `-0`, +0.0.
    """
    return device.type == "cpu" and K % 2 == 1


def assert_bits_equal(out, expected, *, zero_sign_free=False, nan_bits_free=False):
    """out and expected hold the same bits (ignoring the sign of zeros, and which NaN, if
    asked)."""
    assert out.shape == expected.shape, f"shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert out.dtype == expected.dtype, f"dtype {out.dtype} != {expected.dtype}"
    ints = torch.int32 if out.dtype == torch.float32 else torch.int16
    differ = out.view(ints) != expected.view(ints)
    if zero_sign_free:
        differ &= ~((out == 0) & (expected == 0))
    if nan_bits_free:
        differ &= ~(out.isnan() & expected.isnan())
    if differ.any():
        where = differ.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(differ.sum())} of {out.numel()} elements differ; first at {where}: "
            f"{out[tuple(where)].item()!r} != {expected[tuple(where)].item()!r}"
        )


def check_matches_bitsandbytes(backend, N, K, dtype, quant_type, blocksize, nested, storage):
    device = device_of(backend)
    packed, qs = quantize(N, K, dtype, quant_type, blocksize, nested, storage, device)
    expected = bnbF.dequantize_4bit(packed, qs)
    out = lora_kernels.dequantize_4bit(packed, qs, backend=backend)
    assert out.device == device
    zero_sign_free = quant_type == "fp4" and bnb_writes_positive_zero(device, K)
    assert_bits_equal(out, expected, zero_sign_free=zero_sign_free)
    # Every code and (for fp4) both zeros were decoded: the comparison covered the table.
    codes = torch.stack((packed.view(torch.uint8) >> 4, packed.view(torch.uint8) & 15))
    assert codes.unique().numel() == 16


# Every quantization setting on a shape whose blocks span rows (K = 100).
SETTINGS = [
    (quant_type, blocksize, nested, storage, dtype)
    for quant_type in ("nf4", "fp4")
    for blocksize in (64, 128, 256)
    for nested in (False, True)
    for storage in (torch.uint8, torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16, torch.float16)
]


def setting_id(setting):
    quant_type, blocksize, nested, storage, dtype = setting
    nested_id = "double-quant" if nested else "single-quant"
    return f"{quant_type}-bs{blocksize}-{nested_id}-{STORAGE_IDS[storage]}-{DTYPE_IDS[dtype]}"


@pytest.mark.parametrize("setting", SETTINGS, ids=[setting_id(s) for s in SETTINGS])
def test_dequantize_matches_bitsandbytes_bit_for_bit(backend, setting):
    quant_type, blocksize, nested, storage, dtype = setting
    check_matches_bitsandbytes(backend, 48, 100, dtype, quant_type, blocksize, nested, storage)


# Shapes: odd K and odd N * K (a padding nibble), a weight smaller than one block, K a
# multiple of the blocksize, 263 or 267 blocks of 64 (two nested absmax2 blocks of 256;
# bf16 storage needs N * K a multiple of 4), blocksizes 32 and 4096.
SHAPES = [
    (33, 71, "nf4", 64, True, torch.uint8, torch.bfloat16),
    (33, 71, "fp4", 128, False, torch.uint8, torch.float16),
    (3, 5, "fp4", 64, True, torch.uint8, torch.float32),
    (7, 128, "nf4", 64, False, torch.bfloat16, torch.float32),
    (129, 130, "nf4", 64, True, torch.uint8, torch.bfloat16),
    (129, 132, "fp4", 64, True, torch.bfloat16, torch.float32),
    # The smallest and largest blocksizes bitsandbytes has (a Triton program then holds
    # several blocks, or one block of 4096; the last block is short).
    (33, 130, "nf4", 32, True, torch.uint8, torch.bfloat16),
    (9, 1001, "fp4", 4096, True, torch.uint8, torch.float16),
]


def shape_id(case):
    N, K, quant_type, blocksize, nested, storage, dtype = case
    return f"N{N}-K{K}-" + setting_id((quant_type, blocksize, nested, storage, dtype))


@pytest.mark.parametrize("case", SHAPES, ids=[shape_id(c) for c in SHAPES])
def test_dequantize_matches_bitsandbytes_on_odd_shapes(backend, case):
    N, K, quant_type, blocksize, nested, storage, dtype = case
    if N * K < blocksize:  # all 16 codes need more elements than one small block has
        device = device_of(backend)
        packed, qs = quantize(N, K, dtype, quant_type, blocksize, nested, storage, device)
        out = lora_kernels.dequantize_4bit(packed, qs, backend=backend)
        assert_bits_equal(
            out,
            bnbF.dequantize_4bit(packed, qs),
            zero_sign_free=quant_type == "fp4" and bnb_writes_positive_zero(device, K),
        )
        return
    check_matches_bitsandbytes(backend, N, K, dtype, quant_type, blocksize, nested, storage)


def test_fp4_code_8_decodes_to_negative_zero_as_bitsandbytes_kernels_do(backend):
    device = device_of(backend)
    packed = torch.tensor([[0x80], [0x08]], dtype=torch.uint8, device=device)
    qs = bnbF.QuantState(
        absmax=torch.tensor([0.5], device=device),
        shape=torch.Size((1, 4)),
        blocksize=64,
        quant_type="fp4",
        dtype=torch.float32,
    )
    out = lora_kernels.dequantize_4bit(packed, qs, backend=backend)
    assert torch.equal(
        torch.signbit(out), torch.tensor([[True, False, False, True]], device=device)
    )
    assert (out == 0).all()
    if not bnb_writes_positive_zero(device, 4):
        assert_bits_equal(out, bnbF.dequantize_4bit(packed, qs))


# Block scales that push code * absmax to every corner of the narrow roundings: NaN and
# infinities, half's overflow and subnormals, bfloat16's and half's ties (a product whose
# dropped bits are exactly one half, for codes 1.0 and -1.0), and float32 subnormals.
SPECIAL_ABSMAX = [
    float("nan"), float("inf"), float("-inf"), 1e30, 7e4, 1e-6, 3e-8, 1e-40,
    1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, -(1.0 + 2.0**-8),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_rounds_special_scales_as_bitsandbytes(backend, quant_type, dtype):
    device = device_of(backend)
    N, K, blocksize = 48, 100, 64
    packed, qs = quantize(N, K, dtype, quant_type, blocksize, False, torch.uint8, device)
    blocks = qs.absmax.numel()
    scales = SPECIAL_ABSMAX
    if backend == "triton" and device.type == "cpu":
        # The interpreter's float32 -> bfloat16 cast flushes float32 subnormals to zero
        # (a GPU's cvt.rn keeps them; there the case runs).
        scales = [a for a in scales if not 0 < abs(a) < torch.finfo(torch.float32).tiny]
    special = torch.tensor(scales, dtype=torch.float32)
    # Every special scale on several blocks, so each meets all 16 codes.
    absmax = special.repeat(blocks // len(scales) + 1)[:blocks]
    qs.absmax = absmax.to(device)
    out = lora_kernels.dequantize_4bit(packed, qs, backend=backend)
    zero_sign_free = quant_type == "fp4" and bnb_writes_positive_zero(device, K)
    # Which NaN is not part of the format: torch's own float32 -> bfloat16 casts write
    # 0xFFFF (vectorized) or 0x7FC0 (scalar), and the reference decode casts with torch.
    expected = bnbF.dequantize_4bit(packed, qs)
    assert_bits_equal(out, expected, zero_sign_free=zero_sign_free, nan_bits_free=True)
    assert out.isnan().any() and out.isinf().any()


@pytest.mark.parametrize(
    "quant_type, nested, storage, compute_dtype",
    [
        ("nf4", True, torch.uint8, torch.bfloat16),
        ("fp4", False, torch.bfloat16, torch.float16),
        ("nf4", False, torch.float16, torch.float32),
    ],
    ids=["nf4-double-quant-u8", "fp4-single-quant-bf16-storage", "nf4-single-quant-fp16-storage"],
)
def test_dequantize_reads_a_linear4bit_weight(backend, quant_type, nested, storage, compute_dtype):
    device = device_of(backend)
    torch.manual_seed(0)
    # 33 * 68 codes: an even number of bytes, as a 2-byte quant_storage needs.
    layer = bnb.nn.Linear4bit(
        68,
        33,
        compute_dtype=compute_dtype,
        compress_statistics=nested,
        quant_type=quant_type,
        quant_storage=storage,
    ).to(device)
    weight = layer.weight
    assert isinstance(weight, bnb.nn.Params4bit) and quant4bit.is_4bit_weight(weight)
    out = lora_kernels.dequantize_4bit(weight, backend=backend)
    assert out.shape == (33, 68)
    assert_bits_equal(out, bnbF.dequantize_4bit(weight, weight.quant_state))


@pytest.mark.parametrize(
    "N, K, dtype", [(48, 100, torch.bfloat16), (48, 100, torch.float32), (33, 71, torch.float32)]
)
def test_dequantize_writes_into_out_and_returns_it(backend, N, K, dtype):
    device = device_of(backend)
    packed, qs = quantize(N, K, dtype, "nf4", 64, True, torch.uint8, device)
    out = torch.full((N, K), float("nan"), dtype=dtype, device=device)
    result = lora_kernels.dequantize_4bit(packed, qs, out=out, backend=backend)
    assert result is out
    assert_bits_equal(out, bnbF.dequantize_4bit(packed, qs))


def _op_args(device, dtype=torch.bfloat16):
    packed, qs = quantize(48, 100, dtype, "nf4", 64, True, torch.uint8, device)
    w = quant4bit.read_4bit_weight(packed, qs)
    out = torch.empty(w.shape, dtype=w.dtype, device=device)
    args = (w.packed, w.absmax, w.code, w.absmax_code, w.absmax2, w.offset)
    return (*args, w.blocksize, w.blocksize2, out), bnbF.dequantize_4bit(packed, qs)


def _cpp_op_device(device_type: str) -> torch.device:
    """The device of the C++ extension's kernel for `device_type`, or a skip saying why."""
    usable, why = (CPU_USABLE, CPU_WHY) if device_type == "cpu" else (CUDA_USABLE, CUDA_WHY)
    if not usable:
        pytest.skip(f"backend {device_type!r} is not usable: {why}")
    return torch.device(device_type)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_cpp_op_passes_opcheck_schema_autograd_and_fake_tensor_checks(device_type):
    args, _ = _op_args(_cpp_op_device(device_type))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.lora_kernels.cpp_dequantize_4bit, args, test_utils=utils)


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_cpp_op_refuses_operands_its_kernel_cannot_read(device_type):
    args, _ = _op_args(_cpp_op_device(device_type))
    op = torch.ops.lora_kernels.cpp_dequantize_4bit
    packed, absmax, code, absmax_code, absmax2, offset, bs, bs2, out = args
    rest = (code, absmax_code, absmax2, offset, bs, bs2)
    with pytest.raises(RuntimeError, match=r"out must be contiguous float32, bfloat16 or float16"):
        op(packed, absmax, *rest, out.double())
    with pytest.raises(RuntimeError, match=r"packed must be 1-D contiguous uint8 with at least"):
        op(packed[:-1], absmax, *rest, out)
    with pytest.raises(RuntimeError, match=r"absmax must be one contiguous uint8 code per block"):
        op(packed, absmax[:-1], *rest, out)
    with pytest.raises(RuntimeError, match=r"absmax2 one float32 per 256 blocks"):
        op(packed, absmax, code, absmax_code, absmax2[:0], offset, bs, bs2, out)
    with pytest.raises(RuntimeError, match=r"code must be 16 contiguous float32"):
        op(packed, absmax, code[:8], *rest[1:], out)


@pytest.mark.skipif(not CUDA_USABLE, reason=f"backend 'cuda' is not usable: {CUDA_WHY}")
@pytest.mark.gpu
def test_cuda_op_refuses_an_operand_on_another_device():
    args, _ = _op_args(torch.device("cuda"))
    packed, absmax, code, *rest = args
    with pytest.raises(RuntimeError, match=r"code must be on out's device cuda:0, got cpu"):
        torch.ops.lora_kernels.cpp_dequantize_4bit(packed, absmax, code.cpu(), *rest)


@pytest.mark.skipif(TRITON_DEVICE is None, reason=f"triton: {TRITON_WHY}")
def test_triton_op_passes_opcheck_schema_autograd_and_fake_tensor_checks():
    from lora_kernels.backend_triton import dequant  # noqa: F401 (registers the op)

    args, _ = _op_args(TRITON_DEVICE)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.lora_kernels.triton_dequantize_4bit, args, test_utils=utils)


@pytest.mark.skipif(TRITON_DEVICE is None, reason=f"triton: {TRITON_WHY}")
def test_triton_op_refuses_operands_its_kernel_cannot_read():
    from lora_kernels.backend_triton import dequant  # noqa: F401 (registers the op)

    args, _ = _op_args(TRITON_DEVICE)
    op = torch.ops.lora_kernels.triton_dequantize_4bit
    packed, absmax, *rest, out = args
    with pytest.raises(ValueError, match=r"out must be contiguous"):
        op(packed, absmax, *rest, torch.empty_like(out).t().contiguous().t())
    with pytest.raises(ValueError, match=r"packed must be 1-D uint8 with at least 2400 bytes"):
        op(packed[:-1], absmax, *rest, out)
    with pytest.raises(ValueError, match=r"one absmax per block, got blocksize 64 and 74"):
        op(packed, absmax[:-1], *rest, out)


@pytest.mark.skipif(
    TRITON_DEVICE is None or TRITON_DEVICE.type != "cuda",
    reason="needs a CUDA device (inductor compiles the Triton kernel natively)",
)
@pytest.mark.gpu
def test_triton_op_under_inductor_stays_bit_identical():
    """Inductor compiles the kernel with its own options: the nested absmax must still
    not become a fused multiply-add."""
    from lora_kernels.backend_triton import dequant  # noqa: F401 (registers the op)

    args, expected = _op_args(TRITON_DEVICE)

    def run(*args):
        torch.ops.lora_kernels.triton_dequantize_4bit(*args)
        return args[-1] * 1

    out = torch.compile(run, fullgraph=True)(*args)
    assert_bits_equal(out, expected)


def test_dynamo_traces_dequantize_fullgraph(backend):
    device = device_of(backend)
    packed, qs = quantize(48, 100, torch.bfloat16, "fp4", 64, True, torch.uint8, device)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda packed: lora_kernels.dequantize_4bit(packed, qs, backend=backend),
        fullgraph=True,
        backend="eager",
    )
    assert_bits_equal(compiled(packed), bnbF.dequantize_4bit(packed, qs))


def test_automatic_choice_is_the_cpp_kernel_then_triton_on_cuda_and_the_cpp_kernel_on_cpu():
    assert quant4bit._choose_backend("cpu", None) == ("cpu" if CPU_USABLE else "torch")
    triton_usable = backends.availability("triton")[0]
    on_cuda = "cuda" if CUDA_USABLE else "triton" if triton_usable else "torch"
    assert quant4bit._choose_backend("cuda", None) == on_cuda


def test_code_tables_hold_bitsandbytes_values():
    for quant_type in ("nf4", "fp4"):
        ours = quant4bit.code_table(quant_type, torch.device("cpu"))
        theirs = bnbF.get_4bit_type(quant_type, device="cpu")
        assert torch.equal(ours, theirs), quant_type  # == treats -0.0 and +0.0 alike


def test_importing_lora_kernels_does_not_import_bitsandbytes():
    code = "import sys, lora_kernels; assert 'bitsandbytes' not in sys.modules, 'imported'"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# Bad input: each error names the argument, what was expected and what came
# ---------------------------------------------------------------------------------------


@pytest.fixture
def quantized():
    return quantize(48, 100, torch.float32, "nf4", 64, True, torch.uint8, torch.device("cpu"))


def test_a_tensor_without_quant_state_is_refused():
    dense = torch.randn(48, 100)
    with pytest.raises(ValueError, match=r"weight .*has no quant_state"):
        lora_kernels.dequantize_4bit(dense)


def test_a_weight_that_is_not_a_tensor_is_refused(quantized):
    _, qs = quantized
    with pytest.raises(TypeError, match=r"weight must be a bitsandbytes Params4bit .*got list"):
        lora_kernels.dequantize_4bit([1, 2], qs)


def test_a_quant_state_of_the_wrong_type_is_refused(quantized):
    packed, qs = quantized
    with pytest.raises(TypeError, match=r"quant_state must be a bitsandbytes QuantState, got dict"):
        lora_kernels.dequantize_4bit(packed, qs.as_dict())


def test_a_dense_weight_with_a_quant_state_is_refused(quantized):
    _, qs = quantized
    with pytest.raises(ValueError, match=r"weight must hold the 2400 bytes .*got 19200 bytes"):
        lora_kernels.dequantize_4bit(torch.randn(48, 100), qs)


def test_the_transposed_packed_weight_is_refused(quantized):
    packed, qs = quantized
    with pytest.raises(ValueError, match=r"transposed packed layout"):
        lora_kernels.dequantize_4bit(packed.t(), qs)


def test_a_non_contiguous_packed_weight_is_refused(quantized):
    packed, qs = quantized
    strided = torch.stack((packed, packed), dim=1).reshape(-1, 2)[:, :1]
    with pytest.raises(ValueError, match=r"must be contiguous"):
        lora_kernels.dequantize_4bit(strided, qs)


def test_absmax_of_the_wrong_dtype_is_refused():
    packed, qs = quantize(
        48, 100, torch.float32, "nf4", 64, False, torch.uint8, torch.device("cpu")
    )
    qs.absmax = qs.absmax.half()
    with pytest.raises(
        TypeError, match=r"quant_state.absmax must be torch.float32, got torch.float16"
    ):
        lora_kernels.dequantize_4bit(packed, qs)


def test_nested_absmax_of_the_wrong_length_is_refused(quantized):
    packed, qs = quantized
    qs.absmax = qs.absmax[:-1]
    with pytest.raises(
        ValueError, match=r"quant_state.absmax must hold 75 elements, got shape \[74\]"
    ):
        lora_kernels.dequantize_4bit(packed, qs)


def test_a_bad_quant_type_blocksize_or_dtype_is_refused(quantized):
    packed, qs = quantized
    for field, value, message in (
        ("quant_type", "int4", r"quant_type must be one of \('nf4', 'fp4'\), got 'int4'"),
        ("blocksize", 100, r"blocksize must be one of .*got 100"),
        (
            "dtype",
            torch.float64,
            r"dtype .*must be float32, float16 or bfloat16, got torch.float64",
        ),
    ):
        saved = getattr(qs, field)
        setattr(qs, field, value)
        with pytest.raises(ValueError, match=message):
            lora_kernels.dequantize_4bit(packed, qs)
        setattr(qs, field, saved)


def test_an_out_of_the_wrong_dtype_or_shape_is_refused(quantized):
    packed, qs = quantized
    for out in (torch.empty(48, 100, dtype=torch.bfloat16), torch.empty(100, 48)):
        with pytest.raises(
            ValueError, match=r"out must be a torch.float32 tensor of shape \[48, 100\]"
        ):
            lora_kernels.dequantize_4bit(packed, qs, out=out)
    with pytest.raises(ValueError, match=r"out must be contiguous"):
        lora_kernels.dequantize_4bit(packed, qs, out=torch.empty(100, 48).t())


def test_an_unknown_backend_is_refused(quantized):
    packed, qs = quantized
    with pytest.raises(ValueError, match=r"one of \('cuda', 'triton', 'cpu', 'torch'\).*got 'cu'"):
        lora_kernels.dequantize_4bit(packed, qs, backend="cu")


def test_the_cuda_backend_is_refused_for_cpu_tensors_with_the_reason(quantized):
    packed, qs = quantized
    reason = "does not run on cpu tensors" if CUDA_USABLE else "is not usable: "
    with pytest.raises(RuntimeError, match=rf"backend 'cuda' {reason}"):
        lora_kernels.dequantize_4bit(packed, qs, backend="cuda")
