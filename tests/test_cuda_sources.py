"""Every CUDA source in csrc/ compiles with nvcc for sm_80 and sm_90a, warnings as
errors, so a broken kernel cannot land unnoticed on a machine without a GPU.

The .cu files include only CUDA headers (torch-facing code lives in .cpp files), so
this needs nvcc and nothing else: no GPU, no CUDA build of torch.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


def _find_nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home, "bin", "nvcc")
    return str(candidate) if candidate.exists() else None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found (no CUDA toolkit on PATH, in CUDA_HOME or /usr/local/cuda)"
)


def test_there_are_cuda_sources():
    assert [p.name for p in CU_FILES] == ["lora_cuda.cu"]


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
