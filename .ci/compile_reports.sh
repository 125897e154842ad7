#!/usr/bin/env bash
# Part of `make test-long`: the full ahead-of-time compile report (every kernel, every
# autotune config, sm_80 and sm_90) on each supported Triton installed here: .venv's,
# .venv-compat's (the 3.6 floor, `make test-compat`) and .venv-cuda's (the one torch
# 2.14.1 pins, `make test-cuda-build`). A report exits non-zero on a problem.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
ran=0
for venv in .venv .venv-compat .venv-cuda; do
    py=$venv/bin/python
    if ! [ -x "$py" ] || ! "$py" -c "import triton" 2>/dev/null; then
        echo "compile reports: no $venv with Triton here, skipped"
        continue
    fi
    version=$("$py" -c "import triton; print(triton.__version__)")
    log=build/compile-report-triton-$version.txt
    mkdir -p build
    echo "compile reports: Triton $version ($venv), full report in $log"
    status=0
    PYTHONPATH="$repo" "$py" benchmarks/compile_report.py > "$log" 2>&1 || status=$?
    grep -E "compiles|problem" "$log" | tail -n 20
    [ "$status" -eq 0 ] || { echo "compile reports: Triton $version: exit $status"; exit 1; }
    ran=$((ran + 1))
done
[ "$ran" -gt 0 ]
