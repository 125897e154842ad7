"""The CUDA sources build on a machine without a GPU.

- Every .cu file under csrc/ compiles with nvcc for sm_80 and sm_90a, warnings as
  errors. The .cu files include only CUDA headers (torch-facing code lives in .cpp
  files), so this needs nvcc and nothing else: no GPU, no CUDA build of torch.
- The host side of the CUDA implementation (cuda/*.cpp) compiles, syntax only, against
  torch's CUDA headers and the toolkit's, where the installed torch ships them.
- The extension's source lists name every file in csrc/, and no two sources share a
  file stem (the builds name object files by stem, so two would collide in ninja).
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from lora_kernels import backend_cpp

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
CU_FILES = sorted(CSRC.rglob("*.cu"))
CUDA_HOST_FILES = sorted((CSRC / "cuda").glob("*.cpp"))

CUDA_HOME, CUDA_HOME_WHY = backend_cpp.find_cuda_home()
NVCC = str(Path(CUDA_HOME, "bin", "nvcc")) if CUDA_HOME else None
needs_nvcc = pytest.mark.skipif(NVCC is None, reason=f"no CUDA toolkit: {CUDA_HOME_WHY}")


def _rel(path: Path) -> str:
    return path.relative_to(CSRC).as_posix()


def test_there_are_cuda_sources():
    assert [_rel(p) for p in CU_FILES] == ["cuda/cuda_dequant.cu", "cuda/cuda_kernels.cu"]
    assert [_rel(p) for p in CUDA_HOST_FILES] == ["cuda/lora_cuda.cpp"]


def test_source_lists_name_every_file_in_csrc():
    """sdists, the JIT build's digest and the staleness check see every file."""
    listed_sources = set(backend_cpp.CPU_SOURCES + backend_cpp.CUDA_SOURCES)
    on_disk_sources = {_rel(p) for ext in ("*.cpp", "*.cu") for p in CSRC.rglob(ext)}
    assert listed_sources == on_disk_sources
    assert set(backend_cpp.HEADERS) == {_rel(p) for p in CSRC.rglob("*.h")}


def test_sources_have_distinct_object_names():
    """setup.py's ninja build and the JIT build name each object file by the source's
    stem (csrc/a.cpp and csrc/a.cu would both make a.o: 'multiple rules generate')."""
    stems = [Path(name).stem.lower() for name in backend_cpp.sources(True)]
    duplicates = sorted({s for s in stems if stems.count(s) > 1})
    assert not duplicates, f"sources sharing an object name: {duplicates}"


def test_cuda_host_code_includes_no_cuda_library_headers():
    """ATen/cuda/CUDAContext.h pulls in cuBLAS, cuSPARSE and cuSOLVER headers, which a
    minimal toolkit lacks; the stream comes from c10/cuda/CUDAStream.h."""
    for path in CUDA_HOST_FILES:
        text = path.read_text()
        assert "ATen/cuda/CUDAContext.h" not in text, path.name
        assert "c10/cuda/CUDAStream.h" in text, path.name


@needs_nvcc
@pytest.mark.parametrize(
    "arch,std", [("sm_80", "c++17"), ("sm_90a", "c++20")], ids=["sm_80", "sm_90a"]
)
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cuda_source_compiles_without_warnings(source, arch, std, tmp_path):
    command = [
        NVCC,
        "-c",
        str(source),
        "-o",
        str(tmp_path / f"{source.stem}.o"),
        f"-arch={arch}",
        f"-std={std}",
        "-O3",
        f"-I{CSRC}",
        # Every nvcc, ptxas and host-compiler warning is an error.
        "-Werror",
        "all-warnings",
        "-Xcompiler",
        "-Wall,-Wextra,-Werror",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / f"{source.stem}.o").stat().st_size > 0


def _ptx_function(ptx: str, name_part: str) -> str:
    """The body of the one .entry whose mangled name contains name_part."""
    entries = [e for e in ptx.split(".entry ")[1:] if name_part in e.split("(", 1)[0]]
    assert len(entries) == 1, f"{len(entries)} PTX entries named like {name_part!r}"
    return entries[0]


@needs_nvcc
def test_cuda_dequantize_kernel_never_fuses_a_multiply_add(tmp_path):
    """bitsandbytes rounds the nested absmax's product before adding the offset and
    rounds each element's product once: the float32 output's kernel holds rounded
    multiplies and adds and no fma (the 16-bit ones also hold the float -> half
    conversion's exact scaling, which nvcc may fuse harmlessly)."""
    ptx = tmp_path / "cuda_dequant.ptx"
    command = [NVCC, "-ptx", str(CSRC / "cuda" / "cuda_dequant.cu"), "-o", str(ptx)]
    command += ["-arch=sm_90a", "-std=c++20", "-O3", f"-I{CSRC}"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    # The float32 instantiation, dequant_4bit_kernel<float> (mangled: ...IfE...).
    body = _ptx_function(ptx.read_text(), "dequant_4bit_kernelIfE")
    assert "mul.rn.f32" in body and "add.rn.f32" in body
    assert "fma" not in body


def _torch_include_paths():
    """torch's own include directories (the toolkit's is added from CUDA_HOME above)."""
    from torch.utils import cpp_extension

    return [p for p in cpp_extension.include_paths() if Path(p).is_dir()]


TORCH_INCLUDES = _torch_include_paths()
# A CPU-only torch ships some c10/cuda headers but not the generated macros they need.
TORCH_HAS_CUDA_HEADERS = any(
    Path(p, "c10", "cuda", "impl", "cuda_cmake_macros.h").exists() for p in TORCH_INCLUDES
)


@needs_nvcc
@pytest.mark.skipif(
    not TORCH_HAS_CUDA_HEADERS,
    reason=f"torch {torch.__version__} ships no CUDA headers (c10/cuda/impl/cuda_cmake_macros.h): "
    "a CPU-only build; the host CUDA code is checked where torch is a CUDA build",
)
@pytest.mark.parametrize("source", CUDA_HOST_FILES, ids=lambda p: p.name)
def test_cuda_host_source_compiles(source):
    """Syntax only, with the host compiler, against torch's headers and the toolkit's
    include directory alone (so a header that needs more of the toolkit fails here)."""
    command = [
        "c++",
        "-fsyntax-only",
        "-std=c++20",  # what torch's extension builds use
        "-Wall",
        "-Werror",
        f"-I{CSRC}",
        *(f"-I{p}" for p in TORCH_INCLUDES),
        f"-I{Path(CUDA_HOME, 'include')}",
        f"-I{sysconfig.get_paths()['include']}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        str(source),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"


def test_build_requires_no_torch_and_setup_refuses_to_build_without_one(tmp_path):
    """The extension is built against the user's torch: pyproject asks for none (an
    isolated build would fetch another), and setup.py without torch says what to do."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    requires = pyproject["build-system"]["requires"]
    assert not any(r.split("=")[0].split(">")[0].split("<")[0].strip() == "torch" for r in requires)
    setup_py = str(REPO / "setup.py")
    code = (
        "import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
        f"runpy.run_path({setup_py!r}, run_name='__main__')"
    )
    env = {k: v for k, v in os.environ.items() if k != "LORA_KERNELS_NO_EXTENSION"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert result.returncode != 0
    assert "--no-build-isolation" in result.stderr, result.stderr
