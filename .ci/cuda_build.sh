#!/usr/bin/env bash
# `make test-cuda-build`: the extension built with nvcc against a CUDA build of torch, as
# a GPU user builds it, on a machine without a GPU. In its own venv (.venv-cuda):
#   1. torch==2.14.1 (a CUDA 13 build), installed once;
#   2. a wheel of this tree built with nvcc for sm_80 and sm_90, cached under
#      ~/.cache/lora_kernels/cuda-wheels by a hash of its files and the torch version;
#   3. lora_kernels._C imported, its CUDA kernels checked in the dispatcher for every op;
#   4. `python -m lora_kernels` and a small CPU test subset, run against the installed
#      wheel with that torch (a login node: CUDA torch, no GPU).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${CUDA_VENV:-$repo/.venv-cuda}
torch_version=2.14.1
py=$venv/bin/python

[ -x "$py" ] || python3 -m venv "$venv"
if ! "$py" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" \
    2>/dev/null; then
    "$py" -m pip install -q "torch==$torch_version"
fi
"$py" -m pip install -q numpy pytest ninja pybind11 "setuptools>=64" wheel
"$py" -c "import torch; assert torch.version.cuda, torch.__version__; print('torch', torch.__version__)"

cd "$repo"
# Keyed on every file the wheel is built from (the Python package too, which the tests
# below import from the wheel), so that a cached wheel is never stale.
key=$(git ls-files -z setup.py pyproject.toml MANIFEST.in lora_kernels csrc \
    | xargs -0 cat | sha256sum | cut -c1-16)-torch$torch_version
cache=${XDG_CACHE_HOME:-$HOME/.cache}/lora_kernels/cuda-wheels/$key
if ! ls "$cache"/lora_kernels-*.whl >/dev/null 2>&1; then
    tree=$(mktemp -d)
    git ls-files -z | tar --null -T - -c | tar -x -C "$tree"
    start=$(date +%s)
    TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=$(nproc) \
        "$py" -m pip wheel -q --no-build-isolation --no-deps -w "$cache.partial" "$tree"
    mv "$cache.partial" "$cache"
    echo "cuda-build: wheel built in $(( $(date +%s) - start )) s"
    rm -rf "$tree"
else
    echo "cuda-build: cached wheel $(ls "$cache"/*.whl)"
fi
"$py" -m pip install -q --force-reinstall --no-deps "$cache"/lora_kernels-*.whl

# Outside the checkout, so that the installed package (with its _C) is imported.
work=$(mktemp -d)
cd "$work"
"$py" - <<'PY'
import struct

import torch

import lora_kernels
import lora_kernels._C  # noqa: F401

assert "site-packages" in lora_kernels.__file__, lora_kernels.__file__
for op in ("cpp_forward", "cpp_backward", "cpp_keep_mask", "cpp_dequantize_4bit"):
    for key in ("CPU", "CUDA"):
        has = torch._C._dispatch_has_kernel_for_dispatch_key(f"lora_kernels::{op}", key)
        assert has, f"lora_kernels::{op} has no {key} kernel"
print("cuda-build: lora_kernels::cpp_* have CPU and CUDA kernels")

# The fat binary's entries (kind, arch): machine code for sm_80 and sm_90 must be there.
data = open(lora_kernels._C.__file__, "rb").read()
start = data.find(struct.pack("<I", 0xBA55ED50))
assert start >= 0, "no CUDA fat binary in lora_kernels._C"
_, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, start)
entries, pos = set(), start + header_size
while pos < start + header_size + fat_size:
    kind, _, entry_header, size = struct.unpack_from("<HHIQ", data, pos)
    entries.add(({1: "ptx", 2: "sm"}.get(kind, str(kind)), struct.unpack_from("<I", data, pos + 28)[0]))
    pos += entry_header + size
assert {("sm", 80), ("sm", 90)} <= entries, sorted(entries)
print(f"cuda-build: fat binary entries {sorted(entries)}")
usable, why = lora_kernels.available_backends()["cuda"]
assert not usable and "device" in why.lower(), why
print(f"cuda-build: the cuda backend says why it is unusable here: {why}")
PY
"$py" -m lora_kernels
"$py" -m pytest -q -p no:cacheprovider -m "not slow" \
    "$repo/tests/test_backends.py" "$repo/tests/test_backend_cpp.py" "$repo/tests/test_ops.py" \
    -k "cpu and not triton"
