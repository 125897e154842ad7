"""The "cpu" and "cuda" backends: the C++/CUDA extension `lora_kernels._C` (csrc/).

One extension registers `lora_kernels::cpp_forward` and `lora_kernels::cpp_backward`
(schemas in docs/backends.md) with a CPU and, when built with CUDA, a CUDA
implementation; the torch dispatcher picks by device. This module finds the
extension (the installed `lora_kernels._C`, else a JIT build of csrc/ with ninja into
a cache directory), adds the fake (meta) implementations and the autograd formula,
and answers the three questions of the backend contract.

Environment:
    LORA_KERNELS_CACHE_DIR   where JIT builds go (default: $XDG_CACHE_HOME or
                             ~/.cache, then lora_kernels/<hash of sources and flags>)
    MAX_JOBS                 parallel compile jobs (ninja), as for any torch extension
    TORCH_CUDA_ARCH_LIST     CUDA architectures (default: 8.0 and 9.0, plus PTX)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

_CSRC = Path(__file__).resolve().parent.parent / "csrc"

# Sources of the extension, relative to csrc/ (layout in docs/backends.md): the op
# schemas, the shared checks, then each device's implementation and kernels. The CUDA
# ones are added only where both a CUDA build of torch and a CUDA toolkit are present.
# Every source has its own file stem: the builds name object files by stem.
CPU_SOURCES = (
    "lora_ops.cpp",
    "common/op_common.cpp",
    "cpu/lora_cpu.cpp",
    "cpu/cpu_steps.cpp",
    "cpu/cpu_kernels.cpp",
    "cpu/cpu_kernels_avx2.cpp",
    "cpu/cpu_kernels_avx512.cpp",
)
CUDA_SOURCES = ("cuda/lora_cuda.cpp", "cuda/cuda_kernels.cu", "cuda/cuda_dequant.cu")
HEADERS = (
    "common/dequant4_decode.h",
    "common/dropout_mask.h",
    "common/element_math.h",
    "common/kernel_dtype.h",
    "common/op_common.h",
    "common/philox.h",
    "cpu/cpu_common.h",
    "cpu/cpu_dequant.h",
    "cpu/cpu_grad_pass.h",
    "cpu/cpu_kernels.h",
    "cpu/cpu_kernels_impl.h",
    "cpu/cpu_mask.h",
    "cpu/cpu_passes.h",
    "cpu/cpu_steps.h",
    "cpu/cpu_tiles.h",
    "cuda/cuda_dequant.h",
    "cuda/cuda_kernels.h",
)

# The reason shown when a JIT build fails keeps the end of the compiler output.
_MAX_REASON_CHARS = 4000

_lock = threading.Lock()
_status: tuple[bool, str] | None = None
_registered = False


def _nvcc_top(nvcc: str) -> str | None:
    """The toolkit root the nvcc at this path really runs from (a wrapper script that
    execs another nvcc reports the real one's), from `nvcc --dryrun`'s TOP line."""
    import subprocess

    try:
        out = subprocess.run(
            [nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return os.path.realpath(line[len("#$ TOP=") :].strip())
    return None


def _is_toolkit(home: str | os.PathLike | None) -> bool:
    return bool(home) and all(
        Path(home, *part).exists() for part in (("bin", "nvcc"), ("include", "cuda_runtime.h"))
    )


_cuda_home: tuple[str | None, str] | None = None


def _with_skipped(how: str, tried: list[str]) -> str:
    return f"{how}; not used: {'; '.join(tried)}" if tried else how


def find_cuda_home() -> tuple[str | None, str]:
    """(toolkit root, how it was found), or (None, why not): a directory holding
    bin/nvcc and include/cuda_runtime.h, from CUDA_HOME / CUDA_PATH, the nvcc on PATH
    (followed through wrapper scripts), torch's own guess, or /usr/local/cuda.

    torch's guess alone is not enough: with CUDA_HOME unset it takes the parent of the
    nvcc on PATH, which for a wrapper such as /usr/local/bin/nvcc holds no headers.
    """
    global _cuda_home
    if _cuda_home is not None:
        return _cuda_home
    tried = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            if _is_toolkit(value):
                _cuda_home = (value, f"${var}")
                return _cuda_home
            tried.append(f"${var}={value} (no bin/nvcc and include/cuda_runtime.h)")
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        for home, how in (
            (str(Path(real).parent.parent), f"nvcc on PATH ({nvcc})"),
            (_nvcc_top(nvcc), f"the toolkit that {nvcc} runs"),
        ):
            if _is_toolkit(home):
                _cuda_home = (home, _with_skipped(how, tried))
                return _cuda_home
        tried.append(f"nvcc on PATH ({nvcc}): its toolkit has no include/cuda_runtime.h")
    else:
        tried.append("no nvcc on PATH")
    try:
        from torch.utils.cpp_extension import CUDA_HOME as torch_guess
    except Exception:  # the guess is optional
        torch_guess = None
    for home, how in ((torch_guess, "torch's CUDA_HOME"), ("/usr/local/cuda", "/usr/local/cuda")):
        if _is_toolkit(home):
            _cuda_home = (home, _with_skipped(how, tried))
            return _cuda_home
        if home:
            tried.append(f"{how} = {home} (no toolkit there)")
    _cuda_home = (None, "no CUDA toolkit found: " + "; ".join(tried) + " (set CUDA_HOME)")
    return _cuda_home


def cuda_build_possible() -> tuple[bool, str]:
    """Whether the CUDA sources can be compiled here, and why: a CUDA build of torch and
    a CUDA toolkit that is really there (find_cuda_home).

    Decided from the installed torch and the toolkit, never from a visible GPU, so a
    build machine without a GPU still builds the CUDA kernels. Where the toolkit found
    is not the one torch guessed, torch's build helpers are pointed at it.
    """
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    home, how = find_cuda_home()
    if home is None:
        return False, how
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME != home:
        # BuildExtension and load() read this module global for nvcc and the headers.
        cpp_extension.CUDA_HOME = home
    return True, f"CUDA {torch.version.cuda} torch, toolkit at {home} (from {how})"


def cxx_flags() -> list[str]:
    """Host compiler flags of the extension (setup.py uses the same)."""
    flags = ["-O3"]
    if sys.platform != "darwin":  # Apple clang has no -fopenmp; the loops then run serially
        flags.append("-fopenmp")
    return flags


def ld_flags() -> list[str]:
    return ["-fopenmp"] if sys.platform != "darwin" else []


def nvcc_flags() -> list[str]:
    """nvcc flags; sm_80 and sm_90 (+ PTX) unless TORCH_CUDA_ARCH_LIST says otherwise."""
    flags = ["-O3"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        flags += [
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90",
        ]
    return flags


def sources(with_cuda: bool, root: Path = _CSRC) -> list[str]:
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return [str(root / name) for name in names]


def _cache_root() -> Path:
    explicit = os.environ.get("LORA_KERNELS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lora_kernels"


def _build_digest(with_cuda: bool) -> str:
    h = hashlib.sha256()
    for name in sorted(CPU_SOURCES + CUDA_SOURCES + HEADERS):
        path = _CSRC / name
        h.update(name.encode())
        h.update(path.read_bytes() if path.exists() else b"<missing>")
    key = (
        torch.__version__,
        str(torch.version.cuda),
        sys.version,
        str(with_cuda),
        " ".join(cxx_flags() + ld_flags() + (nvcc_flags() if with_cuda else [])),
        os.environ.get("TORCH_CUDA_ARCH_LIST", ""),
    )
    h.update(repr(key).encode())
    return h.hexdigest()[:16]


# Why the CUDA sources are not in the loaded extension where a CUDA build was tried
# and failed (the CPU-only build then ran): the `cuda` backend's reason.
_cuda_build_error: str | None = None


# A JIT build holds torch's lock file in its folder; a process killed mid-build leaves
# it behind, and every later load waits on it forever. No build takes this long (the
# CUDA one takes minutes on 2 cores), so an older lock is a dead builder's.
STALE_LOCK_SECONDS = 30 * 60


def _remove_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        warnings.warn(
            f"lora_kernels: removing the stale JIT build lock {lock} ({age / 60:.0f} min "
            "old, left by a build that was killed)",
            stacklevel=3,
        )
        lock.unlink(missing_ok=True)


def _jit_build_once(with_cuda: bool) -> str:
    from torch.utils import cpp_extension

    name = f"lora_kernels_C_{_build_digest(with_cuda)}"
    build_dir = _cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_lock(build_dir)
    cpp_extension.load(
        name=name,
        sources=sources(with_cuda),
        extra_cflags=cxx_flags(),
        extra_ldflags=ld_flags(),
        extra_cuda_cflags=nvcc_flags() if with_cuda else None,
        extra_include_paths=[str(_CSRC)],
        build_directory=str(build_dir),
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )
    return str(build_dir)


def _jit_build() -> str:
    """Compile csrc/ with ninja into the cache and load it; returns the build folder.

    A failed build with the CUDA sources never takes the CPU backend down: the
    CPU-only build runs next, and the failure becomes the `cuda` backend's reason.
    """
    global _cuda_build_error
    with_cuda, _ = cuda_build_possible()
    if with_cuda:
        try:
            return _jit_build_once(True)
        except Exception as error:
            _cuda_build_error = f"building the CUDA sources failed: {_short(error)}"
    return _jit_build_once(False)


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip()
    if len(text) > _MAX_REASON_CHARS:
        text = "... " + text[-_MAX_REASON_CHARS:]
    return text


def _stale(installed: str) -> bool:
    """Whether csrc/ (a source checkout) changed after the installed extension was built."""
    try:
        built = os.path.getmtime(installed)
        return any(
            (_CSRC / name).exists() and os.path.getmtime(_CSRC / name) > built
            for name in CPU_SOURCES + CUDA_SOURCES + HEADERS
        )
    except OSError:
        return False


def _load_extension() -> tuple[bool, str]:
    spec = importlib.util.find_spec("lora_kernels._C")
    if spec is not None and spec.origin and _stale(spec.origin):
        # An editable install whose csrc/ was edited since: build the current sources.
        installed_error: BaseException = RuntimeError(f"{spec.origin} is older than csrc/")
    else:
        try:
            importlib.import_module("lora_kernels._C")
            return True, "installed extension lora_kernels._C"
        except (ImportError, OSError) as error:
            installed_error = error
    if not (_CSRC / CPU_SOURCES[0]).exists():
        return False, (
            f"lora_kernels._C is not installed ({_short(installed_error)}) and the csrc/ "
            "sources to build it are not there; reinstall with the extension "
            "(pip install . --no-build-isolation)"
        )
    try:
        build_dir = _jit_build()
    except Exception as error:  # a compiler error makes the backend unusable, not the package
        return False, f"building the C++ extension failed: {_short(error)}"
    how = f"C++ extension built from csrc/ with ninja in {build_dir}"
    if _cuda_build_error is not None:
        how += " (CPU sources only: the build with the CUDA sources failed)"
    return True, how


def _forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    from .contract import forward_fake  # here: setup.py loads this file outside the package

    y, u, keep_bits = forward_fake(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    if dropout_p == 0.0 and x.device.type == "cpu":
        # Without dropout the CPU backward recomputes U in its pass over x (the pass dA
        # needs anyway), so the forward saves no U (csrc/cpu/lora_cpu.cpp).
        u = u.new_empty(0, lora_A.shape[0])
    return y, u, keep_bits


def _keep_mask_fake(seed, M, K, dropout_p):
    return seed.new_empty(M, K, dtype=torch.bool)


def _dequantize_4bit_fake(packed, absmax, code, absmax_code, absmax2, offset, bs, bs2, out):
    return None  # writes out only


def _register_python_side() -> None:
    """Fake implementations and the autograd formula, once per process."""
    global _registered
    if _registered:
        return
    from .contract import backward_fake, register_lora_autograd

    torch.library.register_fake("lora_kernels::cpp_forward")(_forward_fake)
    torch.library.register_fake("lora_kernels::cpp_backward")(backward_fake)
    torch.library.register_fake("lora_kernels::cpp_keep_mask")(_keep_mask_fake)
    torch.library.register_fake("lora_kernels::cpp_dequantize_4bit")(_dequantize_4bit_fake)
    ops = torch.ops.lora_kernels
    register_lora_autograd(ops.cpp_forward.default, ops.cpp_backward.default)
    _registered = True


def extension_status() -> tuple[bool, str]:
    """(loaded, how or why not): loads or builds the extension on the first call."""
    global _status
    with _lock:
        if _status is None:
            ok, how = _load_extension()
            if ok:
                try:
                    _register_python_side()
                except Exception as error:
                    ok, how = False, f"registering the extension's ops failed: {_short(error)}"
            _status = (ok, how)
        return _status


def _has_cuda_kernels() -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("lora_kernels::cpp_forward", "CUDA")


def availability(name: str) -> tuple[bool, str]:
    """(usable on this machine, why not) for "cpu" or "cuda". Never raises."""
    try:
        ok, how = extension_status()
        if not ok:
            return False, how
        if name == "cpu":
            return True, f"{how}; CPU kernels: {cpu_isa()}"
        if name == "cuda":
            if not _has_cuda_kernels():
                possible, why = cuda_build_possible()
                if _cuda_build_error is not None:
                    reason = _cuda_build_error
                elif not possible:
                    reason = why
                else:
                    reason = "the extension was built without CUDA sources"
                return False, f"no CUDA kernels in the extension: {reason}"
            if not torch.cuda.is_available():
                return False, "the CUDA kernels are built, but no CUDA device is visible"
            return True, how
        return False, f"backend_cpp serves 'cpu' and 'cuda', not {name!r}"
    except Exception as error:
        return False, _short(error)


def serves(name: str, device_type: str) -> bool:
    """Whether backend `name` runs on tensors of this device type."""
    return name == device_type and name in ("cpu", "cuda")


def load(name: str):
    """(forward_op, backward_op); call only after availability(name) said usable."""
    ok, how = extension_status()
    if not ok:
        raise RuntimeError(f"lora_kernels backend {name!r} is not usable: {how}")
    return torch.ops.lora_kernels.cpp_forward.default, torch.ops.lora_kernels.cpp_backward.default


def keep_mask(seed: torch.Tensor, M: int, K: int, dropout_p: float) -> torch.Tensor:
    """The keep mask [M, K] (bool) the kernels apply, for tests."""
    extension_status()
    return torch.ops.lora_kernels.cpp_keep_mask(seed, M, K, dropout_p)


def cpu_isa(request: str = "") -> str:
    """The CPU kernel build in use ("avx512", "avx2", "baseline").

    `request` selects a build the CPU supports ("auto" restores the automatic choice);
    tests use it to run every build this CPU can run.
    """
    extension_status()
    return torch.ops.lora_kernels.cpp_cpu_isa(request)
