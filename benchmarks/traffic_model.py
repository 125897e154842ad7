"""A traffic/FLOP model of each benchmarked provider: a model, not a measurement.

Each provider is written down as the passes (kernel launches) its design makes, each
with the FLOPs it does and the bytes it must move through device memory (every
operand read once, every output written once; caches ignored). A predicted time is
the roofline sum over passes, sum(max(flops / rate, bytes / bandwidth)), with the
datasheet rates of a device below. It is a lower bound that ignores launch gaps and
GEMM efficiency; its use is the ratio between providers of the same shape, and the
byte count of each design. Philox integer work is added to the compute time of the
pass that generates the mask, not overlapped with its tensor-core work (conservative);
the fused and C++ designs generate it once, in the forward shrink, and keep it packed
one bit per element for backward.

Notation as in docs/design.md: X [M, K], W [N, K], A [R, K], B [N, R], U [M, R].
`e` is bytes per element of X and W, `a` of the adapters (float32 by default, as
peft creates them), `c` of the LoRA branch where a composition promotes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# H100 SXM5 datasheet values (NVIDIA H100 Tensor Core GPU datasheet): dense tensor-core
# rates without sparsity, and HBM3 bandwidth. float32 GEMMs are taken at the non-tensor
# float32 rate because torch's default (allow_tf32=False) keeps them off TF32.
H100_SXM_DATASHEET = {
    "name": "H100 SXM5 (datasheet)",
    "bandwidth": 3.35e12,  # bytes/s
    "mma": {torch.bfloat16: 989.4e12, torch.float16: 989.4e12, torch.float32: 66.9e12},
    # Integer instruction rate for Philox, docs/design.md's estimate (not datasheet).
    "int_ops": 16e12,
}

# One Philox4x32-10 call: 10 rounds of about 6 integer instructions (docs/design.md).
PHILOX_OPS_PER_CALL = 60
# The pure-PyTorch generator in lora_kernels.reference runs ~300 int64 elementwise ops
# over M*K/4 counters; counted once with a TorchDispatchMode over dropout_keep_mask
# (inputs + outputs of every aten op): about 1200 bytes per mask element.
TORCH_PHILOX_BYTES_PER_ELEMENT = 1200


@dataclass(frozen=True)
class Pass:
    """One kernel launch of a design: what it computes, FLOPs, bytes, GEMM dtype."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    mma_dtype: torch.dtype | None = None  # GEMM flops run at this dtype's tensor rate
    int_ops: float = 0.0  # integer instructions (Philox)


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _gemm(name, m, n, k, dtype, extra_bytes=0.0, read_out=False):
    """[m, k] @ [k, n] -> [m, n], all in `dtype` (read_out: accumulates into the output)."""
    b = _nbytes(dtype)
    traffic = b * (m * k + k * n + m * n * (2 if read_out else 1)) + extra_bytes
    return Pass(name, 2.0 * m * n * k, traffic, dtype)


def _ew(name, nbytes, int_ops=0.0):
    return Pass(name, 0.0, nbytes, None, int_ops)


def _philox_ops(M, K):
    return PHILOX_OPS_PER_CALL * M * ((K + 3) // 4)


def linear_passes(mode, M, K, N, R, p, dtype, adapter_dtype, bias):
    """Frozen nn.Linear: one GEMM forward, one (dX) backward."""
    e = _nbytes(dtype)
    fwd = [_gemm("Y = X W^T (+b)", M, N, K, dtype, extra_bytes=e * N if bias else 0)]
    bwd = [_gemm("dX = dY W", M, K, N, dtype)]
    return _by_mode(mode, fwd, bwd)


def peft_passes(mode, M, K, N, R, p, dtype, adapter_dtype, bias):
    """peft lora.Linear: result + lora_B(lora_A(dropout(x.to(a)))) * s, then .to(e)."""
    e, a = _nbytes(dtype), _nbytes(adapter_dtype)
    c = _nbytes(torch.promote_types(dtype, adapter_dtype))
    mk, mn = M * K, M * N
    fwd = [_gemm("Y0 = X W^T (+b)", M, N, K, dtype, extra_bytes=e * N if bias else 0)]
    if e != a:
        fwd.append(_ew("X.to(adapter dtype)", (e + a) * mk))
    if p > 0:
        # native_dropout writes the dropped copy and a bool mask.
        fwd.append(_ew("dropout(X): copy + bool mask", (2 * a + 1) * mk, _philox_ops(M, K)))
    fwd += [
        _gemm("U = Xd A^T", M, R, K, adapter_dtype),
        _gemm("V = U B^T", M, N, R, adapter_dtype),
        _ew("V * s", 2 * a * mn),
        _ew("Y0 + V (promotes)", (e + a + c) * mn),
    ]
    if c != e:
        fwd.append(_ew(".to(x dtype)", (c + e) * mn))
    bwd = []
    if c != e:
        bwd.append(_ew("grad .to(promoted)", (e + c) * mn))
        bwd.append(_ew("grad of Y0 .to(x dtype)", (c + e) * mn))
    bwd += [
        _ew("grad * s", 2 * a * mn),
        _gemm("dB = G^T U", N, R, M, adapter_dtype),
        _gemm("dU = G B", M, R, N, adapter_dtype),
        _gemm("dA = dU^T Xd", R, K, M, adapter_dtype),
        _gemm("dXd = dU A", M, K, R, adapter_dtype),
    ]
    if p > 0:
        bwd.append(_ew("dropout backward (reads mask)", (2 * a + 1) * mk))
    if e != a:
        bwd.append(_ew("grad .to(x dtype)", (a + e) * mk))
    bwd += [_gemm("dX0 = dY W", M, K, N, dtype), _ew("dX = dX0 + dXl", 3 * e * mk)]
    return _by_mode(mode, fwd, bwd)


def unsloth_passes(mode, M, K, N, R, p, dtype, adapter_dtype, bias):
    """Unsloth-style: out = X W^T; out.addmm_(X @ A^T, B^T, alpha=s); adapters cast to e."""
    e = _nbytes(dtype)
    fwd = [
        _gemm("Y = X W^T (+b)", M, N, K, dtype, extra_bytes=e * N if bias else 0),
        _gemm("XA = X A^T", M, R, K, dtype),
        _gemm("Y += s XA B^T (addmm_)", M, N, R, dtype, read_out=True),
    ]
    bwd = [
        _gemm("dXA = s dY B", M, R, N, dtype),
        _gemm("dB = s dY^T XA", N, R, M, dtype),
        _gemm("dXl = dXA A", M, K, R, dtype),
        _gemm("dA = dXA^T X", R, K, M, dtype),
        _gemm("dX0 = dY W", M, K, N, dtype),
        _ew("dX = dX0 + dXl", 3 * e * M * K),
    ]
    return _by_mode(mode, fwd, bwd)


def _bits_bytes(M, K, p):
    """The keep mask packed one bit per element (keep_bits), with dropout."""
    return M * ((K + 7) // 8) if p > 0 else 0


def _shrink_pass(M, K, R, p, dtype, adapter_dtype):
    """U = D(X) A^T, generating the mask (p > 0) and writing it packed (keep_bits)."""
    e, a = _nbytes(dtype), _nbytes(adapter_dtype)
    mask = _philox_ops(M, K) if p > 0 else 0.0
    bits = _bits_bytes(M, K, p)
    return Pass(
        "shrink U = D(X) A^T, keep_bits",
        2.0 * M * K * R,
        e * M * K + a * R * K + 4 * M * R + bits,
        dtype,
        mask,
    )


def fused_passes(mode, M, K, N, R, p, dtype, adapter_dtype, bias):
    """The fused Triton design (docs/design.md): 2 launches forward, 3 backward. The
    shrink generates the mask and writes it packed (keep_bits); dX and dA read it."""
    e, a = _nbytes(dtype), _nbytes(adapter_dtype)
    bits = _bits_bytes(M, K, p)
    mk, mn, mr = M * K, M * N, M * R
    fwd = [
        _shrink_pass(M, K, R, p, dtype, adapter_dtype),
        Pass(
            "Y = X W^T + b + s U B^T",
            2.0 * mn * K + 2.0 * mn * R,
            e * (mk + N * K + mn) + 4 * mr + a * N * R + (e * N if bias else 0),
            dtype,
        ),
    ]
    bwd = [
        Pass("G = dY B, dB = s dY^T U", 4.0 * mn * R, e * mn + 2 * a * N * R + 8 * mr, dtype),
        Pass(
            "dX = dY W + s D(G A)",
            2.0 * mk * N + 2.0 * mk * R,
            e * (mn + N * K + mk) + 4 * mr + a * R * K + bits,
            dtype,
        ),
        Pass("dA = s G^T D(X)", 2.0 * mk * R, 4 * mr + e * mk + a * R * K + bits, dtype),
    ]
    return _by_mode(mode, fwd, bwd)


def cpp_passes(mode, M, K, N, R, p, dtype, adapter_dtype, bias):
    """The C++ design (the cpu and cuda backends): ATen GEMMs with addmm_ accumulation +
    masked LoRA kernels; the shrink writes keep_bits, the masked backward kernels read them."""
    e, a = _nbytes(dtype), _nbytes(adapter_dtype)
    bits = _bits_bytes(M, K, p)
    mk, mr = M * K, M * R
    fwd = [
        _shrink_pass(M, K, R, p, dtype, adapter_dtype),
        _gemm("Y = X W^T (+b)", M, N, K, dtype, extra_bytes=e * N if bias else 0),
        _gemm("Y += s U B^T (addmm_)", M, N, R, dtype, read_out=True),
    ]
    bwd = [
        _gemm("G = dY B", M, R, N, dtype),
        _gemm("dB = s dY^T U", N, R, M, dtype),
        _gemm("dX = dY W", M, K, N, dtype),
        Pass("dX += s D(G A)", 2.0 * mk * R, 2 * e * mk + 4 * mr + a * R * K + bits, dtype),
        Pass("dA = s G^T D(X)", 2.0 * mk * R, 4 * mr + e * mk + a * R * K + bits, dtype),
    ]
    return _by_mode(mode, fwd, bwd)


def torch_backend_passes(mode, M, K, N, R, p, dtype, adapter_dtype, bias):
    """lora_kernels' "torch" backend: ATen composition, mask from the pure-PyTorch Philox."""
    e = _nbytes(dtype)
    cdt = torch.promote_types(dtype, torch.float32)
    c = _nbytes(cdt)
    mk, mn = M * K, M * N
    philox = [_ew("keep mask (pure-PyTorch Philox)", TORCH_PHILOX_BYTES_PER_ELEMENT * mk)]
    dropout = [_ew("x * keep", (2 * c + 1) * mk), _ew("* 1/(1-p)", 2 * c * mk)]
    cast_x = [_ew("x.to(float32)", (e + c) * mk)] if c != e else []
    fwd = (philox if p > 0 else []) + cast_x + (dropout if p > 0 else [])
    fwd += [
        _gemm("U = D(x) A^T", M, R, K, cdt),
        _gemm("Y = X W^T (+b)", M, N, K, dtype, extra_bytes=e * N if bias else 0),
        _gemm("Y += s U B^T (addmm_)", M, N, R, dtype, read_out=True),
    ]
    bwd = list(philox if p > 0 else [])
    if c != e:
        bwd.append(_ew("dY.to(float32)", (e + c) * mn))
    bwd += [
        _gemm("G = dY B", M, R, N, cdt),
        _gemm("dX = dY W", M, K, N, dtype),
        _gemm("G A", M, K, R, cdt),
    ]
    bwd += dropout if p > 0 else []
    bwd.append(_ew("s * D(G A)", 2 * c * mk))
    if c != e:
        bwd.append(_ew(".to(x dtype)", (c + e) * mk))
    bwd.append(_ew("dX +=", 3 * e * mk))
    bwd += cast_x + (dropout if p > 0 else [])
    bwd += [_gemm("dA = s G^T D(x)", R, K, M, cdt), _gemm("dB = s dY^T U", N, R, M, cdt)]
    return _by_mode(mode, fwd, bwd)


# ---------------------------------------------------------------------------------------
# 4-bit base weights (QLoRA): bitsandbytes' NF4/FP4 layout, blocksize 64, double quantized
# (8-bit absmax codes, one float32 absmax2 per 256 blocks), as BitsAndBytesConfig sets it.

QUANT_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


def packed_4bit_bytes(N, K, blocksize=QUANT_BLOCKSIZE, nested=True):
    """Bytes of one 4-bit weight as bitsandbytes stores it: two codes per byte plus the
    absmax (uint8 codes and float32 absmax2 when nested, float32 otherwise)."""
    blocks = -(-N * K // blocksize)
    absmax = blocks + 4 * -(-blocks // NESTED_BLOCKSIZE) if nested else 4 * blocks
    return (N * K + 1) // 2 + absmax


def _dequantize_pass(N, K, dtype, name="dequantize W (4-bit -> dense)"):
    """One launch that reads the packed weight and writes it dense in `dtype`."""
    return _ew(name, packed_4bit_bytes(N, K) + _nbytes(dtype) * N * K)


def linear4bit_passes(mode, M, K, N, R, p, dtype, adapter_dtype, bias):
    """Frozen bitsandbytes Linear4bit at training-sized M: dequantize, then the GEMM
    (bitsandbytes' own dispatch above ~64 tokens); its backward dequantizes again."""
    fwd = [_dequantize_pass(N, K, dtype)] + linear_passes(
        "fwd", M, K, N, R, p, dtype, adapter_dtype, bias
    )
    bwd = [_dequantize_pass(N, K, dtype)] + linear_passes(
        "bwd", M, K, N, R, p, dtype, adapter_dtype, bias
    )
    return _by_mode(mode, fwd, bwd)


def _with_4bit_base(passes_fn):
    """A design on a 4-bit base: its dense passes, plus one dequantize into a workspace
    per direction (backward dequantizes again; no dense weight is kept)."""

    def passes(mode, M, K, N, R, p, dtype, adapter_dtype, bias):
        fwd = [_dequantize_pass(N, K, dtype)] + passes_fn(
            "fwd", M, K, N, R, p, dtype, adapter_dtype, bias
        )
        bwd = [_dequantize_pass(N, K, dtype)] + passes_fn(
            "bwd", M, K, N, R, p, dtype, adapter_dtype, bias
        )
        return _by_mode(mode, fwd, bwd)

    passes.__doc__ = f"{passes_fn.__name__} on a 4-bit base (dequantize, then the dense design)."
    return passes


# DoRA (m [N], n = ||W + s B A|| per row, g = m / n): lora_kernels.dora_op and peft


def _norm_passes(N, K, R, dtype, adapter_dtype):
    """n from the identity (lora_kernels.dora): W A^T, one pass over W (||W_n||^2 cached)."""
    e, a = _nbytes(dtype), _nbytes(adapter_dtype)
    return [Pass("W A^T (norm)", 2.0 * N * K * R, e * N * K + a * (R * K + 2 * N * R), dtype)]


def dora_passes(plain_passes):
    """lora_kernels' DoRA op on a backend whose plain design is `plain_passes`: its
    plain passes plus the DoRA epilogues (lora_kernels/dora_op.py)."""

    def passes(mode, M, K, N, R, p, dtype, adapter_dtype, bias):
        e = _nbytes(dtype)
        mk, mn = M * K, M * N
        plain = {m: plain_passes(m, M, K, N, R, p, dtype, adapter_dtype, bias) for m in MODES_}
        fwd = plain["fwd"] + _norm_passes(N, K, R, dtype, adapter_dtype)
        bwd = list(plain["bwd"])
        scale_w = _ew("W_g = diag(g) W", 2 * e * N * K)
        if p == 0:
            # The plain op on diag(g) W and diag(g) B is DoRA itself.
            fwd.append(scale_w)
            bwd.append(scale_w)
            bwd.append(_ew("dm = (sum dY * Y - b sum dY) / m", 2 * e * mn))
        else:
            bits = _bits_bytes(M, K, p)
            fwd += [
                # Off the CPU: the mask unpacked to bool (1 byte per element), then read
                # by the product (dora_op.mask_dtype).
                _ew("keep mask; X * keep", 2 * e * mk + 2 * mk + bits),
                _gemm("P = (X * keep) W^T", M, N, K, dtype),
                _ew("Y += (g - 1) / (1 - p) P", 3 * e * mn),
            ]
            bwd += [
                _ew("W_c = diag((g - 1) / (1 - p)) W", 2 * e * N * K),
                _gemm("dY W_c", M, K, N, dtype),
                _ew("keep mask; dX += keep * dY W_c", 3 * e * mk + 2 * mk + bits),
                _ew("dm = sum dY P", 2 * e * mn),
            ]
        return _by_mode(mode, fwd, bwd)

    return passes


def fused_dora_passes(mode, M, K, N, R, p, dtype, adapter_dtype, bias):
    """The triton backend's DoRA (lora_kernels.dora_op through backend_triton.dora_forward
    and dora_backward): the fused design's passes with g in the forward epilogue and on
    the B and dY tiles in backward, dm's column sums in the dY pass (it reads Y or P
    beside dY), and with dropout both products of the forward and of dX from one pass
    over W (two accumulators). The [N] vectors g and c and the [N, R] epilogues of dB
    and dm are left out (below 0.1% of the bytes at the layers benchmarked)."""
    e, a = _nbytes(dtype), _nbytes(adapter_dtype)
    bits = _bits_bytes(M, K, p)
    mk, mn, mr = M * K, M * N, M * R
    dropped = p > 0
    fwd = [_shrink_pass(M, K, R, p, dtype, adapter_dtype)]
    fwd += _norm_passes(N, K, R, dtype, adapter_dtype)
    fwd.append(
        Pass(
            "Y, P = X W^T, (X * keep) W^T (+ s U B^T, g, b)"
            if dropped
            else "Y = g (X W^T + s U B^T) + b",
            (4.0 if dropped else 2.0) * mn * K + 2.0 * mn * R,
            e * (mk + N * K + (2 if dropped else 1) * mn)
            + 4 * mr
            + a * N * R
            + (e * N if bias else 0)
            + (bits if dropped else 0),
            dtype,
        )
    )
    bwd = [
        Pass(
            "G = dY diag(g) B, dB, dm's sum dY * kept",
            4.0 * mn * R,
            2 * e * mn + 2 * a * N * R + 8 * mr,
            dtype,
        ),
        Pass(
            "dX = dY W + keep * (dY diag(c) W) + s D(G A)"
            if dropped
            else "dX = dY diag(g) W + s G A",
            (4.0 if dropped else 2.0) * mk * N + 2.0 * mk * R,
            e * (mn + N * K + mk) + 4 * mr + a * R * K + bits,
            dtype,
        ),
        Pass("dA = s G^T D(X)", 2.0 * mk * R, 4 * mr + e * mk + a * R * K + bits, dtype),
    ]
    return _by_mode(mode, fwd, bwd)


def peft_dora_passes(mode, M, K, N, R, p, dtype, adapter_dtype, bias):
    """peft 0.21's DoraLinearLayer on top of its LoRA layer: B(A(eye)) [K, N], the [N, K]
    norm, and the epilogue's elementwise passes over [M, N]; with dropout, X W^T again on
    the dropped input. Counted from peft's forward, one pass per ATen op."""
    e, a = _nbytes(dtype), _nbytes(adapter_dtype)
    c = _nbytes(torch.promote_types(dtype, adapter_dtype))
    mn, nk = M * N, N * K
    plain = {m: peft_passes(m, M, K, N, R, p, dtype, adapter_dtype, bias) for m in MODES_}
    fwd = plain["fwd"] + [
        _gemm("A(eye)", K, R, K, adapter_dtype),
        _gemm("B(A(eye))", K, N, R, adapter_dtype),
        _ew("W + s (B A)^T", (e + 2 * a) * nk),
        _ew("row norms", a * nk),
    ]
    if p > 0:
        fwd.append(_gemm("base = D(X) W^T", M, N, K, dtype))
    elif bias:
        fwd.append(_ew("base = Y0 - b", 2 * e * mn))
    fwd += [
        _ew("(g - 1) * base", 2 * c * mn),
        _ew("g * lora * s", 4 * c * mn),
        _ew("sum, + result", 6 * c * mn),
    ]
    bwd = plain["bwd"] + [
        _ew("grads of the epilogue", 8 * c * mn),
        _ew("dm = sums over rows", 4 * c * mn),
    ]
    if p > 0:
        bwd.append(_gemm("d(D(X)) = dbase W", M, K, N, dtype))
        bwd.append(_ew("dropout backward, dX +=", 5 * e * M * K))
    return _by_mode(mode, fwd, bwd)


MODES_ = ("fwd", "bwd")


def _by_mode(mode, fwd, bwd):
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


# Which design each provider is modelled by.
MODELS = {
    "linear": linear_passes,
    "peft": peft_passes,
    "unsloth": unsloth_passes,
    "lk-triton": fused_passes,
    "lk-cuda": cpp_passes,
    "lk-cpu": cpp_passes,
    "lk-torch": torch_backend_passes,
    # 4-bit bases: peft's lora.bnb.Linear4bit is Linear4bit's forward plus peft's branch.
    "linear4bit": linear4bit_passes,
    "peft-4bit": _with_4bit_base(peft_passes),
    "lk-triton-4bit": _with_4bit_base(fused_passes),
    "lk-cuda-4bit": _with_4bit_base(cpp_passes),
    "peft-dora": peft_dora_passes,
    "lk-dora-triton": fused_dora_passes,
    "lk-dora-cuda": dora_passes(cpp_passes),
    "lk-dora-cpu": dora_passes(cpp_passes),
    "lk-dora-torch": dora_passes(torch_backend_passes),
}


def predict(passes: list[Pass], device: dict = H100_SXM_DATASHEET) -> float:
    """Roofline time in seconds: per pass, max(compute time, memory time), summed."""
    total = 0.0
    for ps in passes:
        compute = ps.int_ops / device["int_ops"]
        if ps.flops:
            compute += ps.flops / device["mma"][ps.mma_dtype or torch.float32]
        total += max(compute, ps.bytes / device["bandwidth"])
    return total


def model(provider: str, mode: str, M, K, N, R, p, dtype, adapter_dtype, bias=False) -> dict:
    """{'flops', 'bytes', 'h100_s', 'passes'} of a provider's design, or {} if unmodelled."""
    fn = MODELS.get(provider)
    if fn is None:
        return {}
    passes = fn(mode, M, K, N, R, p, dtype, adapter_dtype, bias)
    return {
        "flops": sum(ps.flops for ps in passes),
        "bytes": sum(ps.bytes for ps in passes),
        "h100_s": predict(passes),
        "passes": passes,
    }
