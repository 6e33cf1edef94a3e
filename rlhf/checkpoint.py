"""Save and resume step 3 (DeepSpeed-Chat cannot): actor and critic with their optimizers and
schedules (DeepSpeed's per-rank checkpoint files), the EMA's shards, the data position and every
random state, so that a resumed run takes the steps an uninterrupted one would.

OUTPUT_DIR/checkpoints/stepN is written as .tmp-stepN and renamed when every rank has finished, so
a run killed mid-save leaves the previous checkpoint as the latest. Files are read back with
torch.load(weights_only=True): tensors and plain data only, never code from the directory."""
import os
import pickle
import re
import shutil

import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from rlhf.distributed import rank, world_size

STEP_DIR = re.compile(r"^step(\d+)$")
# The non-tensor classes DeepSpeed 0.19 puts in its ZeRO optimizer files (checked for stages 0-3 in fp32
# and bf16): an IntEnum, loss-scaler records and a two-int dataclass, rebuilt from their saved
# attributes (weights_only never calls their code).
SAFE_GLOBALS = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def safe_load(path: str, map_location=None):
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: refused, it needs unpickling Python objects beyond tensors and plain "
                             f"data (loaded with weights_only=True): {str(e).splitlines()[0]}") from None


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True (it passes False)."""

    def load(self, path: str, map_location=None):
        return safe_load(path, map_location)


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint of the highest step; unfinished .tmp-* directories never count."""
    root = checkpoints_root(output_dir)
    steps = [(int(m.group(1)), name) for name in (os.listdir(root) if os.path.isdir(root) else [])
             if (m := STEP_DIR.match(name))]
    return os.path.join(root, max(steps)[1]) if steps else None


def resolve_resume(resume_from: str | None, output_dir: str) -> str | None:
    """--resume_from DIR, or `auto`: the latest checkpoint in --output_dir (None when there is none)."""
    if resume_from is None:
        return None
    if resume_from == "auto":
        return latest_checkpoint(output_dir)
    if not os.path.isfile(os.path.join(resume_from, "rank0.pt")):
        raise ValueError(f"--resume_from {resume_from!r}: not a step-3 checkpoint (no rank0.pt); "
                         f"checkpoints are {checkpoints_root(output_dir)}/stepN")
    return resume_from


def trained(engine) -> list[tuple[str, object]]:
    return [(tag, model) for tag, model in (("actor", engine.actor), ("critic", engine.critic)) if model is not None]


def save_checkpoint(output_dir: str, step: int, engine, state: dict, ema_shards: list[torch.Tensor]) -> str:
    """Every rank calls it. state: this rank's plain data and tensors (positions, random states)."""
    root = checkpoints_root(output_dir)
    final, tmp = os.path.join(root, f"step{step}"), os.path.join(root, f".tmp-step{step}")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    for tag, model in trained(engine):
        model.save_checkpoint(tmp, tag=tag, save_latest=False)
    torch.save({**state, "world_size": world_size(), "ema": [t.clone() for t in ema_shards]},
               os.path.join(tmp, f"rank{rank()}.pt"))
    barrier()
    if rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    barrier()
    return final


def load_checkpoint(path: str, engine, ema_shards: list[torch.Tensor]) -> dict:
    """Restore the engines and EMA shards in place; returns this rank's state dict."""
    state = safe_load(os.path.join(path, f"rank{rank()}.pt"))
    if state["world_size"] != world_size():
        raise ValueError(f"{path} was written by {state['world_size']} ranks; resume it with the same number "
                         f"(this run has {world_size()}): the optimizer states are partitioned per rank")
    for tag, model in trained(engine):
        model.checkpoint_engine = SafeCheckpointEngine()
        loaded, _ = model.load_checkpoint(path, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise ValueError(f"{path}/{tag}: DeepSpeed found no checkpoint to load")
    if len(state["ema"]) != len(ema_shards):
        raise ValueError(f"{path}: holds {len(state['ema'])} EMA tensors, this run has {len(ema_shards)} "
                         "(--enable_ema must match the run that saved it)")
    for dst, src in zip(ema_shards, state["ema"]):
        dst.copy_(src)
    return state
