#!/usr/bin/env bash
# `make test-compat`: the Triton half against the oldest supported Triton (3.6.0, what the
# GPU machines we target ship), in its own venv (.venv-compat) beside torch 2.13.0: the
# interpreter suite of the triton backend, and the ahead-of-time compile report's quick
# set for sm_80 and sm_90 (it exits non-zero on a spill or a shared-memory overflow).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${COMPAT_VENV:-$repo/.venv-compat}
triton_version=3.6.0
py=$venv/bin/python

[ -x "$py" ] || python3 -m venv "$venv"
if ! "$py" -c "import triton, sys; sys.exit(triton.__version__ != '$triton_version')" \
    2>/dev/null; then
    "$py" -m pip install -q torch==2.13.0 "triton==$triton_version"
fi
"$py" -m pip install -q numpy pytest hypothesis
"$py" -c "import torch, triton; print('compat: torch', torch.__version__, 'triton', triton.__version__)"
cd "$repo"
TRITON_INTERPRET=1 PYTHONPATH="$repo" "$py" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_backend_triton.py
PYTHONPATH="$repo" "$py" benchmarks/compile_report.py --quick
