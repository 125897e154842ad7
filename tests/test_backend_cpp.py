"""The C++ extension's CPU backend ("cpu"): output, every gradient and the dropout mask
against the float64 reference, on odd shapes and every CPU kernel build this machine
runs (AVX-512, AVX2, baseline), plus thread-count determinism and opcheck."""

import subprocess
import sys

import pytest
import torch
from helpers import DTYPE_IDS, check_against_reference, make_inputs

import lora_kernels
from lora_kernels import backend_cpp
from lora_kernels.reference import dropout_keep_mask, dropout_scale, pack_keep_mask

pytestmark = pytest.mark.usefixtures("poisoned_empty")
USABLE, REASON = backend_cpp.availability("cpu")
CUDA_USABLE, CUDA_REASON = backend_cpp.availability("cuda")

# The backend name is the device type: "cpu" always, "cuda" where a GPU and the CUDA
# kernels are there (the same tests then check the CUDA kernels).
DEVICES = [
    pytest.param("cpu"),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not CUDA_USABLE, reason=f"backend 'cuda' is not usable: {CUDA_REASON}"
        ),
    ),
]

ISAS = ("avx512", "avx2", "baseline")


def test_cpu_backend_is_usable():
    """The extension builds (or is installed) and loads; fails, not skips, when it does not,
    and then states the compiler's error."""
    assert USABLE, REASON


@pytest.fixture(autouse=True)
def _needs_cpu_backend(request):
    if not USABLE and request.node.originalname != "test_cpu_backend_is_usable":
        pytest.skip(f"backend 'cpu' is not usable: {REASON}")


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test on one CPU kernel build; skipped where this CPU cannot run it."""
    if not USABLE:
        pytest.skip(REASON)
    chosen = backend_cpp.cpu_isa(request.param)
    if chosen != request.param:
        backend_cpp.cpu_isa("auto")
        pytest.skip(f"this CPU does not support the {request.param} build (using {chosen})")
    yield request.param
    backend_cpp.cpu_isa("auto")


def shape_id(shape):
    M, K, N, R = shape
    return f"M{M}-K{K}-N{N}-R{R}"


# Shapes where the CPU kernels change course (tests/test_backends.py has the common odd
# ones): R = 64 (four 16-wide R blocks); M = 600 spans two row chunks of the reduction
# and takes the folded-weight path at p = 0.
SHAPES = [(37, 131, 65, 64), (600, 300, 40, 16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize(
    "dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=DTYPE_IDS.get
)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_row_chunks_r_blocks_and_folded_weight_match_reference(device, shape, dtype, p, bias):
    M, K, N, R = shape
    inputs = make_inputs(M, K, N, R, dtype, bias=bias, learnable_s=True, device=device)
    check_against_reference(device, *inputs, p)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_every_cpu_build_matches_reference(isa, dtype, p):
    inputs = make_inputs(63, 70, 33, 7, dtype, learnable_s=True)
    check_against_reference("cpu", *inputs, p)


# Outputs of 4 MiB or more with vector-aligned rows (Y and dX with dropout, the folded
# weight without) are written with streaming stores: K and N multiples of 16 but not of
# the 64-column padding, M odd and at least N and K (so p=0 folds).
@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
def test_large_outputs_written_with_streaming_stores_match_reference(isa, p):
    inputs = make_inputs(1047, 1040, 1040, 7, torch.float32, learnable_s=True)
    check_against_reference("cpu", *inputs, p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("layout", ["transposed", "strided-rows", "3d-permuted"])
def test_non_contiguous_input(device, p, layout):
    x, W, b, A, B, s = make_inputs(40, 70, 33, 7, torch.float32, device=device)
    base = x.detach()
    if layout == "transposed":  # column stride != 1: the op makes its one copy
        x = base.t().contiguous().t()
    elif layout == "strided-rows":  # unit column stride, row stride 2K: read in place
        x = torch.cat([base, torch.full_like(base, float("nan"))], 1)[:, :70]
    else:
        x = base.reshape(5, 8, 70).transpose(0, 1)
    assert not x.is_contiguous()
    check_against_reference(device, x.requires_grad_(), W, b, A, B, s, p)


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("device", DEVICES)
def test_frozen_adapter_and_frozen_input_skip_their_gradients(device, p):
    # Without dropout the CPU backward recomputes U, and with frozen adapters it needs
    # only the bias's sum over dY (and G for dX): each subset of its grad pass.
    x, W, b, A, B, s = make_inputs(63, 70, 33, 7, torch.float32, learnable_s=True, device=device)
    A.requires_grad_(False)
    B.requires_grad_(False)
    check_against_reference(device, x, W, b, A, B, s, p)
    x, W, b, A, B, s = make_inputs(63, 70, 33, 7, torch.float32, bias=False, device=device)
    x.requires_grad_(False)
    check_against_reference(device, x, W, b, A, B, s, p)
    # Only the bias and x learn (M >= N, K: the LoRA term folded into the weight).
    x, W, b, A, B, s = make_inputs(97, 70, 33, 7, torch.float32, device=device)
    A.requires_grad_(False)
    B.requires_grad_(False)
    check_against_reference(device, x, W, b, A, B, s, p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_no_dropout_forward_saves_no_u(dtype):
    """Without dropout the CPU forward returns u empty: backward recomputes U in the pass
    over x that dA needs anyway, so backward keeps x and nothing else of size."""
    x, W, b, A, B, s, _, seed = _op_args(dtype, 0.0)
    with torch.no_grad():
        y, u, keep_bits = torch.ops.lora_kernels.cpp_forward(x, W, b, A, B, s, 0.0, seed)
        _, u_dropout, _ = torch.ops.lora_kernels.cpp_forward(x, W, b, A, B, s, 0.1, seed)
    assert u.shape == (0, A.shape[0]) and keep_bits.shape == (0,)
    assert u_dropout.shape == (x.shape[0], A.shape[0])
    # The recomputed U is the forward's: ds = sum(G * U) matches the op given U itself.
    grad_y = torch.randn_like(y)
    args = (grad_y, x.detach(), W, A.detach(), B.detach(), s.detach(), 0.0, seed)
    flags = (True, True, True, True)
    recomputed = torch.ops.lora_kernels.cpp_backward(*args, u, keep_bits, *flags)
    u_given = (x.detach().float() @ A.detach().float().t()).to(u.dtype)
    given = torch.ops.lora_kernels.cpp_backward(*args, u_given, keep_bits, *flags)
    for name, a, b2 in zip(["x", "A", "B", "scaling", "bias"], recomputed, given, strict=True):
        torch.testing.assert_close(a, b2, msg=f"grad_{name}")


@pytest.mark.parametrize(
    "M,K,p", [(63, 70, 0.1), (5, 1, 0.5), (3, 301, 0.9), (17, 64, 0.0), (0, 8, 0.1)]
)
def test_keep_mask_is_bit_identical_to_reference(isa, M, K, p):
    for seed in (0, 1234, 2**63 - 1, 0x0123456789ABCDEF):
        seed_t = torch.tensor(seed, dtype=torch.int64)
        keep = backend_cpp.keep_mask(seed_t, M, K, p)
        assert torch.equal(keep, dropout_keep_mask(seed, M, K, p)), f"seed {seed}"


@pytest.mark.skipif(not CUDA_USABLE, reason=f"backend 'cuda' is not usable: {CUDA_REASON}")
@pytest.mark.parametrize("M,K,p", [(63, 70, 0.1), (5, 1, 0.5), (3, 301, 0.9), (17, 64, 0.0)])
def test_cuda_keep_mask_is_bit_identical_to_reference(M, K, p):
    for seed in (0, 1234, 2**63 - 1, 0x0123456789ABCDEF):
        seed_t = torch.tensor(seed, dtype=torch.int64, device="cuda")
        keep = backend_cpp.keep_mask(seed_t, M, K, p).cpu()
        assert torch.equal(keep, dropout_keep_mask(seed, M, K, p)), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
def test_kernels_apply_the_reference_mask(isa, dtype):
    """Forward with W = 0, A = B = I, x = 1 gives Y = D(1); backward with dY = 1 gives
    dX = D(1): both are keep * scale exactly, for the forward and backward kernels."""
    M, K, p, seed = 37, 70, 0.3, 987654321
    eye = torch.eye(K, dtype=dtype)
    scaling = torch.tensor(1.0, dtype=torch.promote_types(dtype, torch.float32))
    seed_t = torch.tensor(seed, dtype=torch.int64)
    x = torch.ones(M, K, dtype=dtype)
    ops = torch.ops.lora_kernels
    args = (x, torch.zeros(K, K, dtype=dtype), None, eye, eye, scaling, p, seed_t)
    y, u, keep_bits = ops.cpp_forward(*args)
    keep = dropout_keep_mask(seed, M, K, p)
    expected = keep.to(dtype) * dropout_scale(p)
    assert torch.equal(y, expected)
    assert torch.equal(u, keep.to(u.dtype) * dropout_scale(p))
    assert torch.equal(keep_bits, pack_keep_mask(keep))
    # Backward reads the saved bits; given none, it regenerates the mask from the seed.
    for bits in (keep_bits, torch.empty(0, dtype=torch.uint8)):
        grad_x, grad_A, grad_B, _, _ = ops.cpp_backward(
            torch.ones(M, K, dtype=dtype), x, args[1], eye, eye, scaling, p, seed_t, u, bits,
            True, True, False, False,
        )  # fmt: skip
        assert torch.equal(grad_x, expected)
        # dA = s G^T D(X) with G = 1: every row of dA is the column sum of the mask.
        torch.testing.assert_close(grad_A, expected.double().sum(0).expand(K, K).to(dtype))


@pytest.mark.parametrize("K", [13, 16])
def test_keep_bits_of_a_p_below_2_to_the_minus_32_are_all_ones(K):
    """p = 1e-12 floors the threshold to 0: every element is kept and no kernel runs
    Philox, but keep_bits is still the packed mask, all ones, padding bits 0."""
    x, W, b, A, B, s, _, seed = _op_args(torch.float32, 0.0, K=K)
    _, _, keep_bits = torch.ops.lora_kernels.cpp_forward(x.detach(), W, b, A, B, s, 1e-12, seed)
    assert torch.equal(keep_bits, pack_keep_mask(torch.ones(x.shape, dtype=torch.bool)))


@pytest.mark.parametrize("K", [1, 9, 70, 257, 1000])
def test_forward_keep_bits_are_the_packed_reference_mask(isa, K):
    """Bit for bit, across column blocks (256 columns) and the last partial Philox
    step of a row, in every CPU kernel build; padding bits 0."""
    M, p, seed = 11, 0.3, 2**40 + 7
    x, W, b, A, B, s, _, _ = _op_args(torch.float32, 0.0, M=M, K=K)
    seed_t = torch.tensor(seed, dtype=torch.int64)
    _, _, keep_bits = torch.ops.lora_kernels.cpp_forward(x.detach(), W, b, A, B, s, p, seed_t)
    assert torch.equal(keep_bits, pack_keep_mask(dropout_keep_mask(seed, M, K, p)))


def test_backward_applies_the_saved_bits():
    """The backward's mask is the keep_bits it is given (here the complement of the
    seed's mask): the CPU steps read the saved bits rather than regenerating them."""
    M, K, p = 21, 75, 0.4
    eye = torch.eye(K)
    scaling = torch.tensor(1.0)
    seed = torch.tensor(123, dtype=torch.int64)
    x = torch.ones(M, K)
    _, u, keep_bits = torch.ops.lora_kernels.cpp_forward(
        x, torch.zeros(K, K), None, eye, eye, scaling, p, seed
    )
    flipped = ~dropout_keep_mask(123, M, K, p)
    grad_x = torch.ops.lora_kernels.cpp_backward(
        torch.ones(M, K), x, torch.zeros(K, K), eye, eye, scaling, p, seed, u,
        pack_keep_mask(flipped), True, False, False, False,
    )[0]  # fmt: skip
    assert torch.equal(grad_x, flipped.float() * dropout_scale(p))


@pytest.mark.parametrize(
    "bad,message",
    [
        ("bits", r"keep_bits must be a contiguous \[M, ceil\(K / 8\)\]"),
        # Without rows U is recomputed, which backward can do only without dropout.
        ("empty u", r"u may be empty \(\[0, R\]\) only without dropout"),
    ],
)
def test_backward_rejects_saved_tensors_it_cannot_use(bad, message):
    x, W, b, A, B, s, p, seed = _op_args(torch.float32, 0.1)
    with torch.no_grad():
        y, u, keep_bits = torch.ops.lora_kernels.cpp_forward(x, W, b, A, B, s, p, seed)
    if bad == "bits":
        keep_bits = keep_bits[:, :-1].contiguous()
    else:
        u = u[:0]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lora_kernels.cpp_backward(
            torch.randn_like(y), x.detach(), W, A.detach(), B.detach(), s.detach(), p, seed,
            u, keep_bits, True, True, False, False,
        )  # fmt: skip


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_results_do_not_depend_on_the_thread_count(dtype, p):
    # Two row chunks of the reductions (M >= 512) and several column blocks.
    x, W, b, A, B, s = make_inputs(600, 300, 130, 16, dtype, learnable_s=True)
    grad_y = torch.randn(600, 130, generator=torch.Generator().manual_seed(3)).to(dtype)

    def run():
        torch.manual_seed(0)
        y = lora_kernels.lora_linear(x, W, b, A, B, s, p, backend="cpu")
        return (y, *torch.autograd.grad(y, [x, b, A, B, s], grad_y))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    names = ["y", "grad_x", "grad_bias", "grad_A", "grad_B", "grad_scaling"]
    for name, a, b2 in zip(names, one, two, strict=True):
        assert torch.equal(a, b2), f"{name} differs between 1 and 2 threads"


def _op_args(dtype, p, M=13, K=70, N=9, R=5):
    g = torch.Generator().manual_seed(5)
    acc = torch.promote_types(dtype, torch.float32)

    def rand(*shape, dt=dtype, grad=False):
        return torch.randn(*shape, generator=g).to(dt).requires_grad_(grad)

    x, W, b = rand(M, K, grad=True), rand(N, K), rand(N, grad=True)
    A, B = rand(R, K, grad=True), rand(N, R, grad=True)
    s = torch.tensor(0.5, dtype=acc, requires_grad=True)
    seed = torch.tensor(42, dtype=torch.int64)
    return x, W, b, A, B, s, p, seed


@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_IDS.get)
def test_opcheck_forward(dtype, p):
    torch.library.opcheck(torch.ops.lora_kernels.cpp_forward.default, _op_args(dtype, p))


@pytest.mark.parametrize("flags", [(True, True, True, True), (False, True, False, False),
                                   (True, False, True, False), (False, False, False, True)],
                         ids=["all", "lora", "x-scaling", "bias"])  # fmt: skip
@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
def test_opcheck_backward(flags, p):
    x, W, b, A, B, s, p, seed = _op_args(torch.float32, p)
    with torch.no_grad():
        y, u, keep_bits = torch.ops.lora_kernels.cpp_forward(x, W, b, A, B, s, p, seed)
    grad_y = torch.randn_like(y)
    args = (grad_y, x.detach(), W, A.detach(), B.detach(), s.detach(), p, seed, u, keep_bits,
            *flags)  # fmt: skip
    torch.library.opcheck(torch.ops.lora_kernels.cpp_backward.default, args)
    out = torch.ops.lora_kernels.cpp_backward(*args)
    for needed, grad in zip((flags[0], flags[1], flags[1], flags[2], flags[3]), out, strict=True):
        assert (grad.numel() > 0) == needed


def test_compile_fullgraph():
    x, W, b, A, B, s = make_inputs(16, 40, 8, 4, torch.float32, learnable_s=True)

    def step(x, A, B):
        return lora_kernels.lora_linear(x, W, b, A, B, s, 0.1, backend="cpu").square().sum()

    torch.manual_seed(0)
    eager = torch.autograd.grad(step(x, A, B), [x, A, B])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(0)
    got = torch.autograd.grad(compiled(x, A, B), [x, A, B])
    for a, e in zip(got, eager, strict=True):
        torch.testing.assert_close(a, e)


def test_bad_arguments_raise_with_names():
    x, W, b, A, B, s, p, seed = _op_args(torch.float32, 0.1)
    op = torch.ops.lora_kernels.cpp_forward
    cases = [
        ((x, W, b, A, B[:, :3], s, p, seed), "lora_B must be \\[N, R\\] = \\[9, 5\\]"),
        ((x, W, b, A, B, s.double(), p, seed), "scaling must be a 0-dim Float tensor, got 0-dim D"),
        ((x, W, b, A, B, s, 1.0, seed), "dropout_p must satisfy 0 <= dropout_p < 1, got 1"),
        ((x, W, b, A, B, s, p, seed.int()), "seed must be a 0-dim int64 tensor, got 0-dim Int"),
        ((x.int(), W, b, A, B, s, p, seed), "x must be float32, .* or float16, got Int"),
        ((x, W.double(), b, A, B, s, p, seed), "weight must have x's dtype Float, got Double"),
        ((x, W, b[:4], A, B, s, p, seed), "bias must be \\[N\\] = \\[9\\]"),
        ((x[None], W, b, A, B, s, p, seed), "x must be 2-D \\[M, K\\], got 3-D"),
    ]  # fmt: skip
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])


def test_cli_reports_cpu_usable():
    out = subprocess.run(
        [sys.executable, "-m", "lora_kernels"], capture_output=True, text=True, check=True
    ).stdout
    line = next(row for row in out.splitlines() if row.strip().startswith("cpu "))
    assert " usable " in line, out


# ---- Build decisions (no compiler runs) ------------------------------------------------


@pytest.fixture
def fresh_cuda_home(monkeypatch):
    """find_cuda_home() recomputed under the test's environment, restored afterwards."""
    monkeypatch.setattr(backend_cpp, "_cuda_home", None)
    yield
    backend_cpp._cuda_home = None


def test_cuda_home_is_rejected_without_headers(fresh_cuda_home, monkeypatch, tmp_path):
    """A CUDA_HOME without bin/nvcc and include/cuda_runtime.h is not taken, and the
    reason names it."""
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home, why = backend_cpp.find_cuda_home()
    assert home != str(tmp_path)
    assert f"$CUDA_HOME={tmp_path}" in why


def test_nvcc_wrapper_script_leads_to_the_real_toolkit(fresh_cuda_home, monkeypatch, tmp_path):
    """An nvcc on PATH that is a script exec'ing the real one (its parent holds no
    headers) still finds the toolkit that nvcc runs."""
    import os
    import shutil
    from pathlib import Path

    real = shutil.which("nvcc")
    if real is None:
        pytest.skip("no nvcc on PATH")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    home, why = backend_cpp.find_cuda_home()
    assert home is not None, why
    assert Path(home, "include", "cuda_runtime.h").exists()
    assert str(tmp_path) not in home


def test_failed_cuda_build_falls_back_to_the_cpu_build(monkeypatch):
    """A JIT build whose CUDA sources fail builds the CPU sources next; the failure is
    the cuda backend's reason."""
    builds = []

    def fake_build(with_cuda):
        builds.append(with_cuda)
        if with_cuda:
            raise RuntimeError("nvcc fatal: broken toolkit")
        return "/cache/cpu-only"

    monkeypatch.setattr(backend_cpp, "cuda_build_possible", lambda: (True, "test"))
    monkeypatch.setattr(backend_cpp, "_jit_build_once", fake_build)
    monkeypatch.setattr(backend_cpp, "_cuda_build_error", None)
    assert backend_cpp._jit_build() == "/cache/cpu-only"
    assert builds == [True, False]
    assert "nvcc fatal: broken toolkit" in backend_cpp._cuda_build_error
    monkeypatch.setattr(backend_cpp, "_has_cuda_kernels", lambda: False)
    usable, why = backend_cpp.availability("cuda")
    assert not usable and "nvcc fatal: broken toolkit" in why
    assert backend_cpp.availability("cpu")[0]


@pytest.mark.parametrize("age_minutes, removed", [(45, True), (2, False)])
def test_jit_build_removes_only_a_stale_lock(age_minutes, removed, tmp_path, monkeypatch):
    import os
    import time

    from torch.utils import cpp_extension

    from lora_kernels import backend_cpp

    monkeypatch.setenv("LORA_KERNELS_CACHE_DIR", str(tmp_path))
    name = f"lora_kernels_C_{backend_cpp._build_digest(False)}"
    lock = tmp_path / name / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    old = time.time() - 60 * age_minutes
    os.utime(lock, (old, old))
    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.append(lock.exists()))
    if removed:
        with pytest.warns(UserWarning, match="stale JIT build lock"):
            backend_cpp._jit_build_once(False)
    else:
        backend_cpp._jit_build_once(False)  # a live build's lock: torch waits on it
    assert seen == [not removed]
