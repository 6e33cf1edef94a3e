"""Run a function on N CPU ranks (gloo): spawned processes, results returned in rank order.

Benchmarks and the multi-rank tests start their own ranks so that one command runs every side of
a comparison.
"""
import os
import tempfile
import traceback

import torch
import torch.multiprocessing as mp

from hybrid_engine.distributed import destroy_process_groups, free_port, remove_deepspeed_shm


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
    destroy_process_groups()


def run_ranks(world: int, fn, *args, threads: int = 1) -> list:
    """fn(rank, world, *args) on each rank with `threads` torch threads; fn sets up torch.distributed
    itself (gloo). Raises RuntimeError with the failing rank's traceback."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        try:
            mp.start_processes(_entry, args=(world, port, threads, outdir, fn, args), nprocs=world,
                               start_method="spawn")
        except mp.ProcessRaisedException as e:
            raise RuntimeError(f"a rank failed:\n{e}") from None
        finally:
            remove_deepspeed_shm(port, world)
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False)["result"] for r in range(world)]
