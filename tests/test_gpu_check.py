"""`make gpu-check`'s dry run: the same script on a CPU (tiny shapes, the interpreter), so
that the command a GPU slot depends on keeps working where no GPU is."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--dry-run", "--commit", "test", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    (out / "bench.csv").write_text("stale\n")  # a rerun must not keep an earlier file
    return out, gpu_check(out)


def test_dry_run_runs_every_step(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    assert list(summary["steps"]) == ["build", "tests", "bench", "profile"]
    assert all(step["status"] == "ok" for step in summary["steps"].values()), summary["steps"]
    env = summary["environment"]
    assert env["commit"] == "test" and env["device"] == "cpu"
    assert env["torch"] and env["triton"] and env["python"]
    assert summary["tests"]["passed"] == 2 and summary["tests"]["failed"] == 0
    assert "| bench | ok |" in proc.stdout


def test_dry_run_writes_at_most_8_files_with_the_figures(dry_run):
    out, _ = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8
    assert {"summary.json", "bench.csv", "autotune.json", "profile.log"} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    providers = {(row["provider"], float(row["p"])) for row in summary["bench"]}
    assert {("linear", 0.1), ("peft", 0.1), ("lk-cpu", 0.1), ("lk-torch", 0.0)} <= providers
    assert all(row["check"].startswith("ok") for row in summary["bench"] if row["p"] == "0")
    profile = (out / "profile.log").read_text()
    for name in ("linear", "peft", "lk-torch"):
        assert f"## {name}: one forward+backward" in profile
    assert "aten::" in profile  # a profiler table, not an empty section
    assert "extension: ok" in (out / "build.log").read_text()


def test_a_step_past_its_timeout_is_reported_and_the_rest_still_run(tmp_path):
    proc = gpu_check(tmp_path, "--steps", "tests", "profile", "--timeout", "tests=0.5")
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"]["tests"]["status"] == "timed out after 0 s"
    assert summary["steps"]["profile"]["status"] == "ok"
    assert "timed out" in (tmp_path / "tests.log").read_text()


def test_bad_timeout_argument_names_the_steps(tmp_path):
    proc = gpu_check(tmp_path, "--timeout", "bench")
    assert proc.returncode != 0
    assert "STEP=SECONDS" in proc.stderr and "profile" in proc.stderr
