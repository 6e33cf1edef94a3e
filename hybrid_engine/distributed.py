"""Process-group housekeeping every multi-rank entry point needs (launcher, RLHF commands)."""
import os
import socket
from pathlib import Path

import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def destroy_process_groups() -> None:
    """Tear down every process group while the interpreter is alive. A gloo group left for exit is
    destroyed during finalization: a gloo worker thread that drops the last reference to a tensor
    with a Python object asks for the GIL, CPython calls pthread_exit on it, and the forced unwind
    through a noexcept frame of ProcessGroupGloo::runLoop aborts the rank ("terminate called without
    an active exception", torch 2.13.0; pytorch issue 190489). The barrier keeps a rank from closing
    its connections while a peer still uses them."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def remove_deepspeed_shm(port: int, world: int) -> None:
    """DeepSpeed's CPU all-reduce op creates one shared-memory file per rank (~66 MB of RAM, in
    /dev/shm) named after the master address and port, and never unlinks it."""
    for rank in range(world):
        Path(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}").unlink(missing_ok=True)
