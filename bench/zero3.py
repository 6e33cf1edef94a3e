"""What the ZeRO-3 benchmarks share: the actor under DeepSpeed ZeRO-3 on CPU ranks, built from a
real configuration with random weights, and the per-phase peak memory of a rank."""
import argparse
from contextlib import contextmanager

import torch
from transformers import AutoModelForCausalLM, OPTConfig

from bench.common import print_environment
from bench.configs import MODELS as REAL_MODELS
from bench.launch import run_ranks
from rlhf.args import add_dtype
from hybrid_engine.capability import DTYPES
from hybrid_engine.memory import reset_peak, return_freed_memory, status_bytes

# "tiny" only exists so that the smoke test runs every path of a benchmark in seconds.
MODELS = {**REAL_MODELS, "tiny": lambda: OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                   ffn_dim=136, vocab_size=1001, max_position_embeddings=128,
                                                   word_embed_proj_dim=64)}
__all__ = ["DTYPES", "MODELS", "add_arguments", "check_tp", "run_benchmark", "zero3_config", "zero3_actor",
           "peak_growth"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options every ZeRO-3 benchmark has."""
    p.add_argument("--model", choices=sorted(MODELS), default="opt-125m", help="configuration to build (random weights)")
    p.add_argument("--world", type=int, default=2, help="CPU ranks (gloo) to start; ZeRO-3 shards over all of them")
    add_dtype(p, "Training dtype (DeepSpeed's bf16 or fp32) and inference dtype")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per rank, the same for every side (the ranks share the machine's cores)")


def check_tp(p: argparse.ArgumentParser, world: int, tps: list[int]) -> None:
    bad = [tp for tp in tps if tp < 1 or world % tp]
    if bad:
        p.error(f"--tp {bad} must divide --world {world}")


def run_benchmark(worker, args: argparse.Namespace) -> tuple[dict, list]:
    """Print the environment, run worker(rank, world, args) on args.world ranks: (environment, results)."""
    env = {**print_environment(args.dtype), "torch_threads_per_rank": args.threads}
    print(f"ranks: {args.world}, torch threads per rank: {args.threads}")
    return env, run_ranks(args.world, worker, args, threads=args.threads)


def zero3_config(dtype: str) -> dict:
    """ZeRO-3 with an Adam optimizer (its states are created lazily, at the first step)."""
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3},
            "bf16": {"enabled": dtype == "bf16"},
            "optimizer": {"type": "Adam", "params": {"lr": 1e-5, "torch_adam": True}}}


def zero3_actor(model: str, dtype: str, seed: int = 0):
    """A DeepSpeed ZeRO-3 engine around `model` with random weights, the same on every rank.

    The model is built whole and partitioned by deepspeed.initialize: deepspeed.zero.Init crashes
    with transformers 5 OPT models."""
    import deepspeed  # imported in the ranks only: it is slow to import and the parent does not need it

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(MODELS[model](), dtype=DTYPES[dtype])  # never a whole fp32 copy for bf16
    engine, *_ = deepspeed.initialize(model=hf, config=zero3_config(dtype), model_parameters=hf.parameters())
    return engine


@contextmanager
def peak_growth():
    """Yields a dict that gets `peak_growth_bytes`: this process's RSS high-water mark during the block
    minus its RSS at the start, and `retained_bytes`: RSS growth still there after the block once freed
    heap is handed back (what the block kept alive). Freed heap is handed back first too, so memory the
    block allocates shows as growth instead of silently reusing what an earlier phase freed; the peak
    still includes allocator caching and fragmentation, not only live tensors."""
    before, measured = reset_peak(), {}
    yield measured
    measured["peak_growth_bytes"] = status_bytes("VmHWM") - before
    return_freed_memory()
    measured["retained_bytes"] = status_bytes("VmRSS") - before
