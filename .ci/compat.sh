#!/usr/bin/env bash
# `make test-compat`: the supported floor, which is what the GPU machines we target ship:
# Python 3.12, torch 2.11.0 (its CUDA 13 build, as there) and Triton 3.6.0, in its own venv
# (.venv-compat). On it: the triton backend's interpreter suite (DoRA's triton cases
# too), the ahead-of-time compile report's quick set for sm_80 and sm_90 (it exits
# non-zero on a spill or a shared-memory overflow), and the CPU tests of the op, the
# layer and the C++ extension, JIT-built against that torch (its CUDA kernels compiled
# too, with no GPU to run them).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${COMPAT_VENV:-$repo/.venv-compat}
torch_version=2.11.0
triton_version=3.6.0
py=$venv/bin/python

find_python() {
    [ -n "${COMPAT_PYTHON:-}" ] && { echo "$COMPAT_PYTHON"; return; }
    for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python; do
        if "$candidate" -c "import sys; sys.exit(sys.version_info[:2] != (3, 12))" 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "compat: no Python 3.12 here (set COMPAT_PYTHON); the floor is tested on python3" >&2
    echo python3
}

[ -x "$py" ] || "$(find_python)" -m venv "$venv"
if ! "$py" -c "import torch, triton, sys
sys.exit(torch.__version__.split('+')[0] != '$torch_version' or triton.__version__ != '$triton_version')" \
    2>/dev/null; then
    "$py" -m pip install -q "torch==$torch_version" "triton==$triton_version"
fi
"$py" -m pip install -q numpy pytest hypothesis ninja
"$py" -c "import platform, torch, triton
print('compat: python', platform.python_version(), 'torch', torch.__version__,
      'triton', triton.__version__)"
cd "$repo"
export PYTHONPATH="$repo"
TRITON_INTERPRET=1 "$py" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_backend_triton.py
# DoRA's flags of the same kernels: test_dora's triton cases (none of them needs peft).
TRITON_INTERPRET=1 "$py" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_dora.py -k triton
"$py" benchmarks/compile_report.py --quick
"$py" -m lora_kernels
"$py" -m pytest -q -p no:cacheprovider -m "not slow" tests/test_backends.py \
    tests/test_backend_cpp.py tests/test_ops.py tests/test_layer.py
