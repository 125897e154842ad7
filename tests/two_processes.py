"""Two CPU processes in one gloo group (loopback), for the distributed tests: each rank's
work runs in a spawned process, saves its results, and the test reads them back."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str, work, args: tuple) -> None:
    """mp.spawn's target: join the group, save `work(rank, out_dir, *args)` as
    out_dir/rank{rank}.pt, and leave once every rank has saved."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(work(rank, out_dir, *args), f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without tearing down: in this torch, freeing a DDP Reducer that holds the
    # last reference to the gloo group joins gloo's worker thread while holding the GIL,
    # and that thread may need the GIL to free a finished work item: a deadlock (seen
    # here, once, as a hang at the worker's exit). Every collective is done (barrier).
    os._exit(0)


def run_two_processes(work, args: tuple, out_dir, timeout_s: float) -> list:
    """`work(rank, out_dir, *args)` (a module-level function) on two processes: what
    each rank returned. A rank's exception fails the test, and so do ranks still running
    after `timeout_s` (they are killed)."""
    context = mp.spawn(
        _rank_main,
        args=(_free_port(), str(out_dir), work, args),
        nprocs=WORLD_SIZE,
        join=False,
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=0.5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{work.__name__}{args} did not finish within {timeout_s} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
