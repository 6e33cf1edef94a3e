"""TRL's GRPO step generating with TRL's own path against the same step generating with ours
(hybrid_engine.integrations.trl.HybridGRPOTrainer), per phase, under DeepSpeed ZeRO-3 on CPU ranks:

    python -m bench.trl --model opt-125m [--reward-model opt-125m] [--world 2] [--batch 8] [--num-generations 4]
                        [--prompt-len 128] [--completion-len 128] [--steps 4] [--warmup 1] [--tp 1] [--out ...]

Paths, each in freshly launched ranks (--world CPU ranks, gloo), each a real trl.GRPOTrainer.train() of
--warmup + --steps steps with TRL's own DeepSpeed integration (`deepspeed=` a ZeRO-3 config, use_cpu=True):
  trl            trl.GRPOTrainer: transformers' generate on the model unwrapped for generation, its ZeRO-3
                 weights gathered whole once per generation (TRL's default ds3_gather_for_generation=True).
  hybrid_engine  HybridGRPOTrainer: ZeRO-3 shards resharded into --tp inference weights, paged KV cache, each
                 prompt's --num-generations completions forked from one prefill; freed before training.
Everything else is TRL's and the same on both: the reward model (--reward-model, a sequence classifier with
random weights, run by TRL under ZeRO-3), the loss, backward and optimizer step, TRL's defaults (beta 0: no
reference model, gradient checkpointing on, learning rate 1e-6).

Phases of a step, timed on each rank by wrapping the trainer's own methods: generation (`_generate`:
tokenizing, generating and, for ours, resharding, also reported apart as reshard_s), reward
(`_calculate_rewards`), scoring (the rest of `_generate_and_score_completions`: advantages, the log-probability
forwards TRL needs), training (the rest of the step: loss, backward, optimizer step) and step (TRL's
on_step_begin to on_step_end). Reported per path: the median over the measured steps of the slowest rank's
phases, generated tokens/s (all ranks), each rank's peak RSS, and for ours the inference memory it held;
ratios are TRL's seconds over ours.

Prompts are random token ids (never EOS or padding) written as text of a word-level tokenizer over the
model's vocabulary (TRL takes text); completions are sampled at temperature 1 and forced to
--completion-len tokens (min_new_tokens, which TRL passes to transformers and maps to ours), so both paths
generate the same number of tokens.
"""
import bench  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE before torch is imported)

import argparse
import os
import statistics
import tempfile
import time

import torch

from bench.checkpoints import random_tokens, write_checkpoints
from bench.common import parse_dtype, print_environment, print_table, write_json
from bench.launch import run_ranks
from bench.zero3 import MODELS, add_arguments, check_tp
from hybrid_engine.memory import status_bytes

GIB, MIB = 2**30, 2**20
PATHS = ("trl", "hybrid_engine")
PHASES = ("generation", "reward", "scoring", "training", "step")
ZERO3 = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto"}


def prompts(tokenizer, args: argparse.Namespace) -> list[str]:
    """Enough distinct random prompts for every step of every rank, as text."""
    count = (args.warmup + args.steps) * args.world * args.batch // args.num_generations
    ids = random_tokens((count, args.prompt_len), tokenizer, torch.Generator().manual_seed(args.seed))
    return [" ".join(tokenizer.convert_ids_to_tokens(row)) for row in ids.tolist()]


def grpo_config(args: argparse.Namespace, out: str):
    import trl

    return trl.GRPOConfig(
        output_dir=out, use_cpu=True, bf16=args.dtype == "bf16", deepspeed=ZERO3, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=args.seed, max_steps=args.warmup + args.steps, shuffle_dataset=False,
        per_device_train_batch_size=args.batch, num_generations=args.num_generations,
        max_completion_length=args.completion_len, generation_kwargs={"min_new_tokens": args.completion_len})


def make_trainer(path: str, args: argparse.Namespace, checkpoints: dict, out: str):
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    from hybrid_engine.integrations.trl import HybridGRPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(checkpoints["actor"])
    common = dict(model=checkpoints["actor"], reward_funcs=checkpoints["reward"], args=grpo_config(args, out),
                  train_dataset=Dataset.from_dict({"prompt": prompts(tokenizer, args)}), processing_class=tokenizer)
    if path == "trl":
        return trl.GRPOTrainer(**common)
    return HybridGRPOTrainer(**common, hybrid_engine={"tp_size": args.tp})


class PhaseTimes:
    """Seconds per phase of each step on this rank: the trainer's methods wrapped, the step from TRL's callbacks."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.steps, self.current, self.start = [], {}, 0.0
        for method in ("_generate", "_calculate_rewards", "_generate_and_score_completions"):
            setattr(trainer, method, self.timed(method, getattr(trainer, method)))
        times = self

        class Steps(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                times.current, times.start = {}, time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                times.end_step(time.perf_counter() - times.start)

        trainer.add_callback(Steps())

    def timed(self, name: str, method):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - start
        return run

    def end_step(self, step: float) -> None:
        c = self.current
        generation, reward, prepared = c["_generate"], c["_calculate_rewards"], c["_generate_and_score_completions"]
        self.steps.append({"generation": generation, "reward": reward, "scoring": prepared - generation - reward,
                           "training": step - prepared, "step": step})


def worker(rank: int, world: int, path: str, args: argparse.Namespace, checkpoints: dict) -> dict:
    from transformers import PrinterCallback

    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(path, args, checkpoints, out)
        trainer.remove_callback(PrinterCallback)  # every step is logged (for the metrics), not printed
        times = PhaseTimes(trainer)
        trainer.train()
    logged = [h for h in trainer.state.log_history if "num_tokens" in h][args.warmup:]
    hybrid = {k.removeprefix("hybrid_engine/"): [h[k] for h in logged] for k in logged[0] if "hybrid_engine/" in k}
    lengths = [h["completions/mean_length"] for h in logged]
    return {"steps": times.steps[args.warmup:], "hybrid": hybrid, "mean_lengths": lengths,
            "peak_rss_bytes": status_bytes("VmHWM"), "world": trainer.accelerator.num_processes}


def summarize(path: str, ranks: list[dict], args: argparse.Namespace) -> dict:
    """Per measured step each phase's slowest rank, then the median over the steps."""
    steps = [{p: max(r["steps"][i][p] for r in ranks) for p in PHASES} for i in range(args.steps)]
    row = {f"{p}_s": statistics.median(s[p] for s in steps) for p in PHASES}
    completions = args.world * args.batch
    row.update(path=path, tp=args.tp if path == "hybrid_engine" else None, steps=steps,
               generated_tokens_per_step=completions * args.completion_len,
               tokens_per_s=completions * args.completion_len / row["generation_s"],
               mean_completion_lengths=ranks[0]["mean_lengths"], world_seen_by_trl=ranks[0]["world"],
               peak_rss_gib_per_rank=[r["peak_rss_bytes"] / GIB for r in ranks])
    hybrid = ranks[0]["hybrid"]
    if hybrid:
        row.update(reshard_s=statistics.median(hybrid["reshard_seconds"]), hybrid_engine_metrics=hybrid,
                   inference_memory_mib=max(hybrid["memory_bytes"]) / MIB)
    return row


def table(rows: dict[str, dict]) -> list[dict]:
    ratio = {f"{p}_s": rows["trl"][f"{p}_s"] / rows["hybrid_engine"][f"{p}_s"] for p in PHASES}
    out = [{"path": name, **{f"{p}_s": row[f"{p}_s"] for p in PHASES}, "reshard_s": row.get("reshard_s", "-"),
            "tokens/s": row["tokens_per_s"], "peak_rss_gib": "/".join(f"{g:.2f}" for g in row["peak_rss_gib_per_rank"]),
            "inference_mib": row.get("inference_memory_mib", "-")} for name, row in rows.items()]
    out.append({"path": "trl / ours", **ratio, "reshard_s": "-", "tokens/s": rows["hybrid_engine"]["tokens_per_s"]
                / rows["trl"]["tokens_per_s"], "peak_rss_gib": "-", "inference_mib": "-"})
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--reward-model", choices=sorted(MODELS), default="opt-125m",
                   help="configuration of the reward model (random weights, same vocabulary as --model)")
    p.add_argument("--batch", type=int, default=8, help="completions per rank per step (per_device_train_batch_size)")
    p.add_argument("--num-generations", type=int, default=4, help="completions per prompt (GRPO's group size)")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt")
    p.add_argument("--completion-len", type=int, default=128, help="tokens per completion (forced)")
    p.add_argument("--steps", type=int, default=4, help="measured GRPO steps per path")
    p.add_argument("--warmup", type=int, default=1, help="GRPO steps per path before the measured ones")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of our inference weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the prompts and TRL's")
    p.add_argument("--out", default=None, help="JSON path (default results/trl-<model>-w<world>-<dtype>.json)")
    args = p.parse_args(argv)
    parse_dtype(p, args)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_tp(p, args.world, [args.tp])
    for name in ("batch", "num_generations", "prompt_len", "completion_len", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.num_generations < 2 or args.world * args.batch % args.num_generations:
        p.error(f"--num-generations must be >= 2 (GRPO compares a prompt's completions) and divide --world x --batch "
                f"= {args.world * args.batch}, got {args.num_generations}")
    positions = MODELS[args.model]().max_position_embeddings
    if args.prompt_len + args.completion_len > positions:
        p.error(f"--prompt-len + --completion-len must be at most {args.model}'s {positions} positions")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = {**print_environment(args.dtype), "torch_threads_per_rank": args.threads, "load_average": os.getloadavg()}
    print(f"GRPO: actor {args.model}, reward model {args.reward_model}, {args.dtype}, ZeRO-3 on {args.world} ranks x "
          f"{args.threads} thread(s); per rank and step: {args.batch} completions ({args.batch // args.num_generations}"
          f" prompt(s) x {args.num_generations}), prompt {args.prompt_len} + completion {args.completion_len} "
          f"(forced); {args.warmup} warm-up + {args.steps} measured steps per path; ours at tp {args.tp}")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as root:
        checkpoints = write_checkpoints(args, root)
        for path in PATHS:
            rows[path] = summarize(path, run_ranks(args.world, worker, path, args, checkpoints, threads=args.threads),
                                   args)
    print(f"\nseconds per GRPO step, median of {args.steps}, slowest rank per phase (load average "
          f"{os.getloadavg()[0]:.2f}); last row: TRL's seconds over ours (tokens/s: ours over TRL's)")
    print_table(table(rows), ["path", *[f"{p}_s" for p in PHASES], "reshard_s", "tokens/s", "peak_rss_gib",
                              "inference_mib"])
    print("generation_s includes reshard_s; peak_rss_gib: VmHWM of each rank over its whole life; inference_mib: our "
          "inference weights, prepacked copies, KV cache and exchange buffers at their largest")
    write_json(args.out or f"results/trl-{args.model}-w{args.world}-{args.dtype}.json",
               {"args": vars(args), "environment": env, "paths": rows,
                "ratios": {k: v for k, v in table(rows)[-1].items() if k.endswith("_s") and k != "reshard_s"}})


if __name__ == "__main__":
    main()
