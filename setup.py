"""Build entry point: `pip install -e . --no-build-isolation`.

The C++/CUDA extension `lora_kernels._C` (csrc/) is added in `_extensions()`: built
with torch's BuildExtension and ninja, CPU sources always, CUDA sources when the
installed torch is a CUDA build and a CUDA toolkit is really there (bin/nvcc and
include/cuda_runtime.h, see backend_cpp.find_cuda_home; never decided from a visible
GPU), for sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise. MAX_JOBS limits
the parallel compile jobs; LORA_KERNELS_NO_CUDA=1 builds the CPU sources only.
LORA_KERNELS_NO_EXTENSION=1 installs the pure-Python package only; the "cpu"/"cuda"
backends then build the extension on first use.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _build_config():
    """lora_kernels/backend_cpp.py, loaded by path: its source list and flags are the
    ones the JIT build uses too (importing the package would import far more)."""
    path = ROOT / "lora_kernels" / "backend_cpp.py"
    spec = importlib.util.spec_from_file_location("_lora_kernels_build_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    """The compiled extensions and the build command class that builds them."""
    if os.environ.get("LORA_KERNELS_NO_EXTENSION") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:
        raise SystemExit(
            "lora_kernels: the C++ extension is built against the torch that will import "
            "it, and this build sees none (" + str(error) + "). Install torch first, then "
            "`pip install --no-build-isolation .` (pip's isolated build would build against "
            "another torch), or set LORA_KERNELS_NO_EXTENSION=1 for the pure-Python package."
        ) from error

    config = _build_config()
    with_cuda, why = config.cuda_build_possible()
    print(f"lora_kernels._C: CPU sources{' and CUDA sources' if with_cuda else ''} ({why})")
    sources = [os.path.relpath(p, ROOT) for p in config.sources(with_cuda, ROOT / "csrc")]
    compile_args = {"cxx": config.cxx_flags()}
    if with_cuda:
        compile_args["nvcc"] = config.nvcc_flags()
    make = CUDAExtension if with_cuda else CppExtension
    extension = make(
        "lora_kernels._C",
        sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=compile_args,
        extra_link_args=config.ld_flags(),
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="lora_kernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for LoRA fine-tuning",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    # The floor tested by `make test-compat`: what the GPU machines we target ship.
    python_requires=">=3.11",
    install_requires=["torch>=2.11", "numpy"],
    extras_require={"triton": ["triton>=3.6"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
