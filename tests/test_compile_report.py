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
DORA_VARIANTS = ("fwd_dora", "fwd_dora_p", "bwd_dy_dora", "bwd_dx_dora", "bwd_dx_dora_p")
KERNELS += DORA_VARIANTS

needs_ptxas = pytest.mark.skipif(
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


@needs_ptxas
def test_quick_report_compiles_every_kernel_for_sm80_and_sm90():
    out = run_report("--quick")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    table = rows(out.stdout)
    seen = {(r[0], r[-6]) for r in table}  # (kernel, target); config cells have spaces
    assert seen == {(k, t) for k in KERNELS for t in ("sm_80", "sm_90")}
    assert all(r[-1] == "ok" for r in table)
    # bf16 GEMMs use the tensor cores: wgmma on Hopper, mma.sync on Ampere.
    mma = {(r[0], r[-6]): r[-2] for r in table}
    for kernel in ("shrink", "fwd", "bwd_dy", "bwd_dx", "bwd_da", "bwd_db", *DORA_VARIANTS):
        assert mma[kernel, "sm_90"] == "wgmma"
        assert mma[kernel, "sm_80"] == "mma"
    assert "0 with problems" in out.stdout


@needs_ptxas
def test_report_fails_when_a_kernel_exceeds_shared_memory():
    out = run_report("--quick", "--kernels", "fwd", "--shared-limit", "1024")
    assert out.returncode == 1, out.stdout[-4000:] + out.stderr[-4000:]
    assert "shared" in out.stdout and "> 1024 B" in out.stdout


# compile_launch with compile_one replaced: each config "compiles" to the spill count in
# its BLOCK_M (-1: a shared-memory overflow); prints (problem, status) per row.
_LAUNCH_SCRIPT = """
import runpy
report = runpy.run_path({script!r}, run_name="report")
Row, compile_launch = report["Row"], report["compile_launch"]
def fake_compile_one(name, spec, case, config, target, block_r, dropout, shared_limit=None):
    spill = config.kwargs["BLOCK_M"]
    row = Row(name, "bf16", "", block_r, str(spill), "sm_90", regs=64, spill_bytes=max(spill, 0))
    row.problem = "shared 1 B > 0 B" if spill < 0 else ("spills" if spill else "")
    return row
compile_launch.__globals__["compile_one"] = fake_compile_one
import triton
for spills, quick in {cases!r}:
    listed = [triton.Config({{"BLOCK_M": s}}) for s in spills]
    rows = compile_launch(("shrink", None, None, (9, 0), 16, True, listed), quick)
    print([(r.problem, r.status) for r in rows])
"""


def test_a_spill_is_a_problem_only_when_every_config_of_the_launch_spills():
    cases = [((12, 0), False), ((12, 24), False), ((12,), False), ((12, 0, 8), True)]
    cases += [((-1, 0), False)]
    code = _LAUNCH_SCRIPT.format(script=str(SCRIPT), cases=cases)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-4000:]
    lines = out.stdout.strip().splitlines()
    dropped = ("", "spills 12 B: dropped at launch")
    assert lines[0] == str([dropped, ("", "")])
    every = "(no config of this launch is spill-free)"
    assert lines[1] == str([(f"spills 12 B {every}", ""), (f"spills 24 B {every}", "")])
    assert lines[2] == str([(f"spills 12 B {every}", "")])  # one config: it runs, spilling
    # --quick stops at the first clean config
    assert lines[3] == str([dropped, ("", "")])
    assert lines[4] == str([("shared 1 B > 0 B", ""), ("", "")])
