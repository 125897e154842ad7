"""benchmarks/compile_report.py: every kernel compiles for sm_80 and sm_90 without a GPU.

The report runs in a subprocess: it needs Triton's compiler (kernels defined without
TRITON_INTERPRET), while this test session may have the interpreter switched on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="Triton is not installed")

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compile_report.py"
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
KERNELS = ("shrink", "fwd", "bwd_dy", "bwd_dx", "bwd_da", "bwd_db", "sum_partials")
KERNELS += ("dropout_mask", "dropout_bits", "dequant4", "dequant4_dq")

pytestmark = pytest.mark.skipif(
    not (NVIDIA_BIN / "ptxas").exists(),
    reason=f"this Triton does not bundle NVIDIA's ptxas ({NVIDIA_BIN})",
)


def run_report(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def rows(stdout: str) -> list[list[str]]:
    table = stdout.split("\nsummary")[0].splitlines()[1:]
    return [line.split() for line in table if line.strip()]


def test_quick_report_compiles_every_kernel_for_sm80_and_sm90():
    out = run_report("--quick")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    table = rows(out.stdout)
    seen = {(r[0], r[-6]) for r in table}  # (kernel, target); config cells have spaces
    assert seen == {(k, t) for k in KERNELS for t in ("sm_80", "sm_90")}
    assert all(r[-1] == "ok" for r in table)
    # bf16 GEMMs use the tensor cores: wgmma on Hopper, mma.sync on Ampere.
    mma = {(r[0], r[-6]): r[-2] for r in table}
    for kernel in ("shrink", "fwd", "bwd_dy", "bwd_dx", "bwd_da", "bwd_db"):
        assert mma[kernel, "sm_90"] == "wgmma"
        assert mma[kernel, "sm_80"] == "mma"
    assert "0 with problems" in out.stdout


def test_report_fails_when_a_kernel_exceeds_shared_memory():
    out = run_report("--quick", "--kernels", "fwd", "--shared-limit", "1024")
    assert out.returncode == 1, out.stdout[-4000:] + out.stderr[-4000:]
    assert "shared" in out.stdout and "> 1024 B" in out.stdout
