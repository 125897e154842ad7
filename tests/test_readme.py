"""Every ```python block of the README runs as written, and so does its ```bash block that
runs DDP and FSDP2 on CPU processes (gloo) with torchrun."""

import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

import lora_kernels

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", TEXT, flags=re.S)
GLOO_BLOCKS = [
    block
    for block in re.findall(r"```bash\n(.*?)```", TEXT, flags=re.S)
    if 'init_process_group("gloo")' in block
]
# Two torchrun launches of two processes each, every one importing torch and
# transformers: about 20 s each on two idle cores, more on a loaded machine.
GLOO_TIMEOUT_S = 300


def test_readme_has_python_examples():
    assert BLOCKS, "README.md has no ```python blocks"


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"block{i}")
def test_readme_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(BLOCKS[index], f"README.md block {index}", "exec"), {"__name__": "readme"})


def run_bash(script: str, cwd, env: dict, timeout_s: float) -> tuple[int, str, str]:
    """Run `script` with bash -e; past timeout_s, stop it and everything it started, and
    fail the test. torchrun starts each worker in a session of its own and stops them
    on SIGTERM, so the script's process group gets SIGTERM first, then SIGKILL."""
    process = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
                stdout, stderr = process.communicate(timeout=30)
                break
            except (subprocess.TimeoutExpired, ProcessLookupError):
                stdout, stderr = "", ""
        pytest.fail(
            f"the script did not finish within {timeout_s} s\n{stdout[-3000:]}{stderr[-3000:]}"
        )
    return process.returncode, stdout, stderr


def test_readme_gloo_block_runs(tmp_path):
    """The CPU variant of the DDP/FSDP2 script, run by bash as a user would: both engines
    train three steps on both ranks, and rank 0 writes the adapter."""
    assert len(GLOO_BLOCKS) == 1, f"README.md has {len(GLOO_BLOCKS)} gloo ```bash blocks, not 1"
    env = dict(os.environ)
    # torchrun beside this interpreter; the workers import the lora_kernels under test.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    package_root = str(pathlib.Path(lora_kernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    returncode, stdout, stderr = run_bash(GLOO_BLOCKS[0], tmp_path, env, GLOO_TIMEOUT_S)
    assert returncode == 0, stdout[-3000:] + stderr[-3000:]
    # The two ranks share stdout, so one's line may be cut by the other's: no anchors.
    losses = re.findall(r"rank (\d) step (\d) loss (-?\d+\.\d{4}|nan|-?inf)", stdout)
    # Two engines x two ranks x three steps, every loss a finite number.
    assert sorted((rank, step) for rank, step, _ in losses) == sorted(
        (rank, step) for rank in "01" for step in "012" for _engine in range(2)
    ), stdout + stderr[-4000:]
    assert all(math.isfinite(float(loss)) for _, _, loss in losses), losses
    # The adapter of the last run (FSDP2), gathered: 2 layers x 7 modules x (A, B).
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * 2, sorted(tensors)
    assert all(torch.isfinite(t).all() for t in tensors.values())
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
