"""Process groups of the RLHF steps: one init for gloo (CPUs) and NCCL (GPUs), the rank and world
size, and scalar reductions over ranks in one all-reduce."""
import os

import deepspeed
import torch
import torch.distributed as dist

from hybrid_engine.distributed import free_port


def init_distributed() -> torch.device:
    """gloo on CPUs, NCCL on GPUs; a plain `python -m` run becomes a world of one."""
    if "RANK" not in os.environ:  # not started by deepspeed/torchrun: no MPI discovery, a free port
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    if not cuda:
        return torch.device("cpu")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    """Reduce scalars over ranks in one all-reduce."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=op)
    return t.tolist()


def collective_device() -> torch.device:
    """NCCL reduces device tensors only; gloo, host tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_sum(*values: float) -> list[float]:
    return all_reduce(list(values))


def all_max(value: float) -> float:
    return all_reduce([value], dist.ReduceOp.MAX)[0]
