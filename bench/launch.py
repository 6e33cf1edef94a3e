"""Run a function on N CPU ranks (gloo): processes forked from a server that imported torch, DeepSpeed
and transformers once, results returned in rank order.

Benchmarks and the multi-rank tests start their own ranks so that one command runs every side of
a comparison.
"""
import ctypes
import importlib
import os
import signal
import sys
import tempfile
import traceback
from multiprocessing import forkserver

import torch
import torch.multiprocessing as mp

from hybrid_engine.distributed import destroy_process_groups, free_port, remove_deepspeed_shm

# Imported once by the fork server instead of by every rank of every launch: 4-5 s of CPU per rank
# (torch alone 2.4 s), which was most of a small multi-rank test on 2 vCPUs.
PRELOAD = ["torch", "torch.distributed", "deepspeed", "transformers", "hybrid_engine"]


def _end_with_parent() -> None:
    """A rank's parent is the fork server, which exits when the last holder of its liveness pipe does:
    SIGTERM the rank then (Linux prctl PR_SET_PDEATHSIG), so that killing a benchmark does not leave
    its ranks running. multiprocessing hands each forked child that pipe too (Python 3.11); a rank
    holding it would keep the server, and so itself, alive: the rank closes it."""
    server = forkserver._forkserver
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
        server._forkserver_alive_fd = None
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the server was already gone before the prctl took effect
        os._exit(1)


def _entry(rank: int, world: int, port: int, threads: int, environ: dict, outdir: str, fn, args) -> None:
    _end_with_parent()
    # the fork server's environment is the one of the first launch; each launch brings its own
    os.environ.clear()
    os.environ.update(environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        result = fn(rank, world, *args)
    except Exception:
        torch.save({"error": traceback.format_exc()}, os.path.join(outdir, f"{rank}.pt"))
        raise
    torch.save({"result": result}, os.path.join(outdir, f"{rank}.pt"))
    destroy_process_groups()


def importable(fn):
    """fn, or for a function of a module run with `python -m`, the same function imported by the
    module's name: a forked rank never ran `__main__`, so it cannot unpickle `__main__.fn`."""
    if fn.__module__ != "__main__":
        return fn
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        raise ValueError(f"run_ranks cannot start {fn.__qualname__} of a script run by its path: define it in a "
                         f"module, or run the script with `python -m`")
    return getattr(importlib.import_module(spec.name), fn.__qualname__)


def run_ranks(world: int, fn, *args, threads: int = 1) -> list:
    """fn(rank, world, *args) on each rank with `threads` torch threads; fn sets up torch.distributed
    itself (gloo). Raises RuntimeError with the failing rank's traceback."""
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)
    port = free_port()
    with tempfile.TemporaryDirectory() as outdir:
        try:
            mp.start_processes(_entry, args=(world, port, threads, dict(os.environ), outdir, importable(fn), args),
                               nprocs=world, start_method="forkserver")
        except mp.ProcessRaisedException as e:
            raise RuntimeError(f"a rank failed:\n{e}") from None
        finally:
            remove_deepspeed_shm(port, world)
        return [torch.load(os.path.join(outdir, f"{r}.pt"), weights_only=False)["result"] for r in range(world)]
