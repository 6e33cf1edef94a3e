"""Run a function on N CPU ranks (gloo): spawned processes, results returned in rank order.

Benchmarks start their own ranks so that one command runs every side of a comparison. (The
tests' launcher, tests/multirank.py, does the same and could import this one.)
"""
import os
import socket
import tempfile
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, threads: int, outdir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        result = fn(rank, world, *args)
    except Exception:
        torch.save({"error": traceback.format_exc()}, os.path.join(outdir, f"{rank}.pt"))
        raise
    torch.save({"result": result}, os.path.join(outdir, f"{rank}.pt"))


def run_ranks(world: int, fn, *args, threads: int = 1) -> list:
    """fn(rank, world, *args) on each rank with `threads` torch threads; fn sets up torch.distributed
    itself (gloo). Raises RuntimeError with the failing rank's traceback."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    with tempfile.TemporaryDirectory() as outdir:
        try:
            mp.start_processes(_entry, args=(world, free_port(), threads, outdir, fn, args), nprocs=world,
                               start_method="spawn")
        except mp.ProcessRaisedException as e:
            raise RuntimeError(f"a rank failed:\n{e}") from None
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False)["result"] for r in range(world)]
