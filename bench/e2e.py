"""Real PPO iterations of rlhf's step-3 trainer, split into generation, experience and training, for the
ways a user can run the same iteration (DeepSpeed-Chat's Figure 5 on this machine):

    python -m bench.e2e --model opt-1.3b [--reward-model opt-350m] [--world 2] [--batch 2]
                        [--prompt-len 256] [--answer-len 256] [--iterations 2] [--tp 1 2] [--out ...]
                        [--algorithm ppo|grpo|rloo] [--samples G]

Paths, each in its own freshly launched ranks (memory is freed between paths), each running one
warm-up iteration (answers of --warmup-answer-len tokens) and then --iterations measured ones through
rlhf.ppo_loop's functions:
  ds_chat        transformers' generate on the ZeRO-3 actor: every forward gathers every layer
                 (DeepSpeed-Chat without its hybrid engine).
  gather_once    every actor parameter gathered once per iteration (one all_gather each, LoRA merged)
                 into a plain, un-hooked transformers model built beforehand, then its generate; the
                 gather is part of generation_s and reported apart as gather_s. The plain model's
                 weights are dropped after each generation (as vLLM's sleep mode does), so training
                 does not hold a second full copy of the actor.
  hybrid_engine  ours (--enable_hybrid_engine): ZeRO-3 shards resharded into TP inference weights;
                 resharding is part of generation_s and reported apart as reshard_s.
The actor, reference, critic and reward model are built from the real configurations with random
weights (the critic and the reward model share --reward-model's architecture) and saved once per run
as checkpoints the rlhf code loads. Actor and critic run under ZeRO-3 on --world CPU ranks (gloo).
--algorithm grpo / rloo runs the critic-free iteration instead (no critic; --samples answers per
prompt, sampled on every path with num_return_sequences): our path forks each prompt's KV blocks for
its G answers, the others hold G copies. After its measured iterations, ours generates the last batch
once more with each prompt repeated G times (untimed) and reports the peak KV blocks and bytes of both
(prompt_kv in its row): the prompt KV the fork saved, measured.
Prompts are random token ids (never EOS), the same on every path; every answer is forced to
--answer-len tokens (--min_answer_seq_len = --max_answer_seq_len), sampled as PPO samples.

--slow-answer-len N (< --answer-len) times ds_chat's generation on N tokens and on 1 token and
extrapolates it to --answer-len (the 1-token run's time plus the per-token decode rate between the
two); the answers are then filled up to --answer-len with random tokens so that experience and
training run on the same lengths as every other path. Such a path says so: `extrapolated` and
`timed_answer_tokens` in its row and in the JSON.

Reported per path: which forward gave the actor's old logprobs (--old-logprobs-from: recorded as
sampled on our path in fp32, else the training model's), the median over measured iterations (each the
slowest rank's time) of every phase, seconds per sequence (all ranks' sequences), generated tokens/s
(all ranks), per-rank peak RSS (VmHWM over the whole rank, loading included, and over the measured
iterations alone), and each path's speed-up against ds_chat and gather_once. Memory is planned before
anything is launched: the per-rank estimate of every path is printed, and a run whose estimate exceeds
the memory available now is refused with what would fit.
"""
import bench  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE before torch is imported)

import argparse
import os
import resource
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PretrainedConfig

from bench.checkpoints import random_tokens, write_checkpoints
from bench.common import parse_dtype, print_environment, print_table, write_json
from bench.launch import run_ranks
from bench.zero3 import DTYPES, MODELS, check_tp
from hybrid_engine import _C
from hybrid_engine.engine import unwrap
from hybrid_engine.memory import CACHE_HEADROOM, limit_cpu_cache, reset_peak, status_bytes
from hybrid_engine.models import prepack
from rlhf.args import add_dtype
from rlhf.ppo_args import OLD_LOGPROBS_FROM, samples_per_prompt

GIB, MIB = 2**30, 2**20
LORA_MODULES = "layers."  # OPT's model.decoder.layers.N and LLaMA's model.layers.N
BASELINES = ("ds_chat", "gather_once")
PHASES = ("generation", "experience", "training")
# Memory beyond the itemised plan: a fraction of it plus a fixed part (DeepSpeed's fixed-size buffers,
# allocator caching). Calibrated on the peaks measured per rank (2 ranks, bf16): opt-125m PPO 4.8-5.0 GiB,
# opt-125m GRPO (G 8) 5.44, opt-1.3b PPO (LoRA 128) 8.3 (ds_chat) and 9.5 (hybrid_engine --tp 2), and
# 10.1 in generation at --tp 1 in a per-phase trace's first iteration, before the 1.2 GiB of optimizer
# state the first step creates.
UNITEMISED, UNITEMISED_FIXED = 0.1, 1.0 * GIB
# The actor's ZeRO-3 training step beyond its activations and logits (gathered layers for the recompute,
# gradient buckets, optimizer temporaries), per byte of the actor's weights. Measured: OPT-1.3B, LoRA 128,
# checkpointing, 2 ranks x 2 x 512 tokens: 4.1 GiB above the step's start against 0.48 itemised;
# 1.2 x 2.45 GiB, with the unitemised part (below) on top, covers it.
ZERO3_STEP = 1.2


# ---- the rlhf flags of a path -----------------------------------------------------------------
def ppo_argv(args: argparse.Namespace, path: str, tp: int, checkpoints: dict[str, str], out: str) -> list[str]:
    """rlhf.ppo's flags for one path: DeepSpeed-Chat's benchmark setting with a forced answer length."""
    argv = ["--data_path", "unused", "--actor_model_name_or_path", checkpoints["actor"],
            "--critic_model_name_or_path", checkpoints["reward"], "--output_dir", out,
            "--max_prompt_seq_len", str(args.prompt_len), "--max_answer_seq_len", str(args.answer_len),
            "--min_answer_seq_len", str(args.answer_len), "--per_device_generation_batch_size", str(args.batch),
            "--per_device_training_batch_size", str(args.batch), "--actor_zero_stage", "3",
            "--critic_zero_stage", "3", "--dtype", args.dtype, "--num_warmup_steps", "0", "--seed", str(args.seed),
            "--algorithm", args.algorithm, "--num_samples_per_prompt", str(args.samples)]
    if args.lora_dim:
        argv += ["--actor_lora_dim", str(args.lora_dim), "--critic_lora_dim", str(args.lora_dim),
                 "--actor_lora_module_name", LORA_MODULES, "--critic_lora_module_name", LORA_MODULES,
                 "--only_optimize_lora"]
    if args.gradient_checkpointing:
        argv += ["--actor_gradient_checkpointing", "--critic_gradient_checkpointing"]
    if path.startswith("hybrid_engine"):
        argv += ["--enable_hybrid_engine", "--inference_tp_size", str(tp),
                 "--old_logprobs_from", args.old_logprobs_from]
    return argv


# ---- the paths --------------------------------------------------------------------------------
class Extrapolated:
    """A rollout timed on `timed` tokens and on 1, extrapolated to the full answer length; the answers
    are filled up with random tokens (never EOS) so experience and training see full lengths."""

    def __init__(self, inner, timed: int, tokenizer):
        self.inner, self.timed, self.tokenizer = inner, timed, tokenizer

    def __call__(self, input_ids, attention_mask, sampling, samples, generator):
        from rlhf.rollout import Rollout

        full = sampling.max_new_tokens
        n = min(self.timed, full)
        _, one = self.timed_call(input_ids, attention_mask, sampling, samples, generator, 1)
        out, timed = self.timed_call(input_ids, attention_mask, sampling, samples, generator, n)
        fill = random_tokens((len(out.sequences), full - n), self.tokenizer, generator)
        return Rollout(torch.cat([out.sequences, fill], 1), torch.full((len(out.sequences),), full), out.times,
                       {"one_token_generation_s": one, "timed_generation_s": timed,
                        "generation_estimate_s": one + (full - 1) * (timed - one) / (n - 1)})

    def timed_call(self, input_ids, attention_mask, sampling, samples, generator, n: int):
        start = time.perf_counter()
        out = self.inner(input_ids, attention_mask, replace(sampling, max_new_tokens=n, min_new_tokens=n), samples,
                         generator)
        return out, time.perf_counter() - start


def prompt_batches(tokenizer, args: argparse.Namespace, rank: int, count: int) -> list[dict]:
    """Per iteration, --batch random prompts of --prompt-len tokens, left-padded as rlhf collates them;
    the same on every path (seeded by rank and iteration)."""
    from rlhf.data import collate_prompts

    batches = []
    for i in range(count):
        g = torch.Generator().manual_seed(args.seed + 1000 * rank + i)
        rows = random_tokens((args.batch, args.prompt_len), tokenizer, g)
        batches.append(collate_prompts([{"prompt_ids": r} for r in rows], tokenizer.pad_token_id))
    return batches


class PhaseUsage:
    """The path's rollout, wrapped to measure each phase of an iteration apart: generation (the rollout),
    experience (the rest of generate_experience), training. Per phase: peak RSS, CPU seconds (user +
    system, which load on the machine barely changes, unlike wall time) and minor page faults. Each
    phase starts a new peak window; freed heap is not handed back for it (that would make the next
    phase fault its pages in again: the rlhf code itself decides when it does)."""

    def __init__(self, rollout):
        self.rollout, self.phases, self.start = rollout, {}, None

    def __call__(self, *args):
        self.begin()
        try:
            return self.rollout(*args)
        finally:
            self.end("generation")

    def begin(self) -> None:
        reset_peak(hand_back=False)
        self.start = resource.getrusage(resource.RUSAGE_SELF)

    def end(self, phase: str) -> None:
        now, start = resource.getrusage(resource.RUSAGE_SELF), self.start
        self.phases[phase] = {"peak_rss_bytes": status_bytes("VmHWM"), "minor_faults": now.ru_minflt - start.ru_minflt,
                              "cpu_s": now.ru_utime + now.ru_stime - start.ru_utime - start.ru_stime}
        self.begin()


def rollout_for(path: str, args: argparse.Namespace, models):
    """How the path generates: rlhf's own rollout (ds_chat or hybrid_engine), gather_once, or ds_chat
    extrapolated from shorter runs."""
    from rlhf.rollout import GatherOnce

    if path == "gather_once":
        plain = AutoModelForCausalLM.from_config(unwrap(models.actor).config, dtype=DTYPES[args.dtype])
        return GatherOnce(models.actor, plain)
    if path == "ds_chat" and args.slow_answer_len:
        return Extrapolated(models.rollout, args.slow_answer_len, models.tokenizer)
    return models.rollout


def run_iteration(models, rollout: PhaseUsage, batch: dict, cfg, state) -> dict:
    """One PPO iteration as rlhf.ppo runs it; seconds per phase (training = actor + critic steps)."""
    from rlhf.ppo_loop import add_times, generate_experience, train_iteration

    dist.barrier()
    start = time.perf_counter()
    exp = generate_experience(models, rollout, batch, cfg, state)
    if exp is None:
        raise RuntimeError("an answer of at most one token was dropped: the forced length did not hold")
    rollout.end("experience")
    times, measured = dict(state.times), dict(state.stats)
    state.times = {}
    train_iteration(models, [exp], None, cfg, state)
    rollout.end("training")
    times = add_times(times, state.times)
    iteration = time.perf_counter() - start
    if "generation_estimate_s" in measured:  # the measured short runs are replaced by the extrapolation
        iteration += measured["generation_estimate_s"] - times["generation"]
        times["generation"] = measured["generation_estimate_s"]
    return {"generation_s": times["generation"], "reshard_s": times.get("reshard"), "gather_s": times.get("gather"),
            "experience_s": times["experience"],
            "training_s": times["actor_training"] + times.get("critic_training", 0.0),
            "actor_training_s": times["actor_training"], "critic_training_s": times.get("critic_training"),
            "iteration_s": iteration, "generated_tokens": int(exp.action_mask.sum()),
            **{k: measured[k] for k in ("one_token_generation_s", "timed_generation_s") if k in measured}}


def answer_config(cfg, length: int):
    """cfg with every answer forced to `length` tokens."""
    return replace(cfg, sampling=replace(cfg.sampling, max_new_tokens=length, min_new_tokens=length))


def worker(rank: int, world: int, args: argparse.Namespace, path: str, tp: int, checkpoints: dict,
           cache_bytes: float) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from rlhf.distributed import init_distributed
    from rlhf.ppo_args import parse_args as ppo_parse_args, steps_per_role
    from rlhf.ppo_loop import PPOConfig, new_state
    from rlhf.rlhf_engine import build_rlhf_engine, check_models

    if _C.cpu_cache_installed():
        limit_cpu_cache(int(cache_bytes))
    device = init_distributed()
    with tempfile.TemporaryDirectory() as out:
        ppo_args = ppo_parse_args(ppo_argv(args, path, tp, checkpoints, out))
        tokenizer = AutoTokenizer.from_pretrained(checkpoints["actor"])
        check_models(ppo_args, tokenizer)
        total = 1 + args.iterations
        models = build_rlhf_engine(ppo_args, tokenizer, steps_per_role(ppo_args, total, False), device)
        cfg, state, rollout = PPOConfig.from_args(ppo_args, tokenizer), new_state(models, ppo_args.seed), \
            PhaseUsage(rollout_for(path, args, models))
        batches = prompt_batches(tokenizer, args, rank, total)
        setup_peak = status_bytes("VmHWM")
        records, usage = [], []
        for i, batch in enumerate(tqdm(batches, desc=f"{path} (1 warm-up + {args.iterations})", disable=rank != 0)):
            length = args.answer_len if i else args.warmup_answer_len
            records.append(run_iteration(models, rollout, batch, answer_config(cfg, length), state))
            usage.append(dict(rollout.phases))
        peaks = [u[p]["peak_rss_bytes"] for u in usage for p in PHASES]
        kv = prompt_kv(rollout, batches[-1], cfg, state) if path.startswith("hybrid") and args.samples > 1 else None
        return {"iterations": records[1:], "peak_rss_bytes": max(setup_peak, *peaks),
                "peak_rss_iterations_bytes": max(peaks[len(PHASES):]), "phase_usage": phase_usage(usage[1:]),
                "prompt_kv": kv, "old_logprobs_from": ppo_args.old_logprobs_from}


def phase_usage(iterations: list[dict]) -> dict[str, dict]:
    """Per phase over the measured iterations: the largest peak RSS, the mean CPU seconds and faults."""
    usage = {}
    for p in PHASES:
        values = [it[p] for it in iterations]
        usage[p] = {"peak_rss_bytes": max(v["peak_rss_bytes"] for v in values),
                    **{k: statistics.mean(v[k] for v in values) for k in ("cpu_s", "minor_faults")}}
    return usage


@torch.no_grad()
def prompt_kv(rollout, batch: dict, cfg, state) -> dict:
    """Peak KV blocks (and bytes) of generating the batch with each prompt's G answers forked from one
    prefill, as the iterations did, and with each prompt repeated G times (G separate copies)."""
    from rlhf.ppo_loop import rollout_answers

    g, ids, mask = cfg.samples, batch["input_ids"], batch["attention_mask"]
    runs = {"forked": (ids, mask, g), "repeated": (ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0), 1)}
    kv = {}
    for name, (input_ids, attention_mask, samples) in runs.items():
        rollout_answers(rollout, input_ids, attention_mask, cfg.sampling, samples, state)
        kv[f"{name}_peak_blocks"] = int(state.stats["kv_peak_blocks"])
        kv[f"{name}_peak_bytes"] = int(state.stats["kv_peak_blocks"] * state.stats["kv_block_bytes"])
    kv["saved_bytes"] = kv["repeated_peak_bytes"] - kv["forked_peak_bytes"]
    kv["block_bytes"] = int(state.stats["kv_block_bytes"])
    return kv


# ---- summary ----------------------------------------------------------------------------------
def summarize(results: list[dict], args: argparse.Namespace, path: str, tp: int) -> dict:
    """Per iteration the slowest rank's record (its phases add up within its iteration time), then the
    median of each figure over the iterations; per-sequence and per-token figures over all ranks."""
    sequences = args.batch * args.world * args.samples
    slowest = [max((r["iterations"][i] for r in results), key=lambda x: x["iteration_s"])
               for i in range(args.iterations)]
    keys = [k for k, v in slowest[0].items() if v is not None and k != "generated_tokens"]
    row = {k: statistics.median(record[k] for record in slowest) for k in keys}
    timed = args.slow_answer_len if path == "ds_chat" and args.slow_answer_len else args.answer_len
    row.update({f"{phase}_s_per_seq": row[f"{phase}_s"] / sequences for phase in (*PHASES, "iteration")})
    row.update(tp=tp if path.startswith("hybrid_engine") else None, old_logprobs_from=results[0]["old_logprobs_from"],
               generated_tokens=sum(r["iterations"][-1]["generated_tokens"] for r in results),
               extrapolated=timed != args.answer_len, timed_answer_tokens=timed,
               peak_rss_gib_per_rank=[r["peak_rss_bytes"] / GIB for r in results],
               peak_rss_iterations_gib_per_rank=[r["peak_rss_iterations_bytes"] / GIB for r in results],
               phase_usage_per_rank={p: [r["phase_usage"][p] for r in results] for p in PHASES})
    if results[0]["prompt_kv"] is not None:
        row["prompt_kv_per_rank"] = [r["prompt_kv"] for r in results]
    row["tokens_per_s"] = sequences * args.answer_len / row["generation_s"]
    return row


def add_ratios(paths: dict[str, dict]) -> None:
    """Speed-up of each path against each baseline: baseline seconds / path seconds, per phase."""
    for row in paths.values():
        for base in BASELINES:
            if base in paths:
                row[f"x_vs_{base}"] = {f"{p}_s": paths[base][f"{p}_s"] / row[f"{p}_s"] for p in (*PHASES, "iteration")}


def table_rows(paths: dict[str, dict]) -> list[dict]:
    rows = []
    for name, row in paths.items():
        cells = {"path": name, **{c: row.get(c) for c in ("generation_s", "reshard_s", "gather_s", "experience_s",
                                                            "training_s", "iteration_s")},
                 **{f"{p[:3]}_s/seq": row[f"{p}_s_per_seq"] for p in PHASES}, "tokens/s": row["tokens_per_s"],
                 "peak_rss_gib": "/".join(f"{g:.2f}" for g in row["peak_rss_gib_per_rank"]),
                 "extrapolated": f"yes ({row['timed_answer_tokens']} timed)" if row["extrapolated"] else "no",
                 "old_logprobs": row["old_logprobs_from"]}
        for base in BASELINES:
            ratios = row.get(f"x_vs_{base}", {})
            cells[f"gen_x_{base}"] = ratios.get("generation_s")
            cells[f"iter_x_{base}"] = ratios.get("iteration_s")
        rows.append({k: "-" if v is None else v for k, v in cells.items()})
    return rows


def phase_rows(paths: dict[str, dict]) -> tuple[list[dict], list[str]]:
    """Per phase, each path's seconds, its share of that path's iteration and its speed-up against each
    baseline run before it; and the columns in path order."""
    rows, columns = [], ["phase"]
    for phase in (*PHASES, "iteration"):
        cells = {"phase": phase}
        for i, (name, row) in enumerate(paths.items()):
            cells[f"{name}_s"] = row[f"{phase}_s"]
            cells[f"{name}_%"] = f"{100 * row[f'{phase}_s'] / row['iteration_s']:.0f}"
            cells.update({f"{name}_x_{b}": row[f"x_vs_{b}"][f"{phase}_s"] for b in list(paths)[:i] if b in BASELINES})
        rows.append(cells)
    return rows, [*columns, *(c for c in rows[0] if c != "phase")]


def usage_rows(paths: dict[str, dict], key: str, scale: float, digits: int) -> list[dict]:
    """Per phase, each path's `key` of every phase usage, one value per rank."""
    def cell(usage: list[dict]) -> str:
        return "/".join(f"{u[key] / scale:.{digits}f}" for u in usage)
    return [{"phase": phase, **{name: cell(row["phase_usage_per_rank"][phase]) for name, row in paths.items()}}
            for phase in PHASES]


def print_prompt_kv(paths: dict[str, dict]) -> None:
    for name, row in paths.items():
        for rank, kv in enumerate(row.get("prompt_kv_per_rank", [])):
            print(f"{name} rank {rank}: peak KV {kv['forked_peak_blocks']} blocks "
                  f"({kv['forked_peak_bytes'] / 2**20:.3g} MiB) with each prompt's answers forked, "
                  f"{kv['repeated_peak_blocks']} blocks "
                  f"({kv['repeated_peak_bytes'] / 2**20:.3g} MiB) with each prompt repeated: "
                  f"{kv['saved_bytes'] / 2**20:.3g} MiB of prompt KV saved")


def plot(paths: dict[str, dict], title: str, png: str) -> None:
    """DeepSpeed-Chat's Figure 5: per path, one bar of seconds per sequence split into the phases."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(paths)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 4.5))
    bottom = [0.0] * len(names)
    for phase, color in zip(PHASES, ("#d62728", "#ff7f0e", "#1f77b4")):
        values = [paths[n][f"{phase}_s_per_seq"] for n in names]
        ax.bar(names, values, bottom=bottom, color=color, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    for i, n in enumerate(names):
        note = f"{bottom[i]:.3g} s" + (f"\n(generation extrapolated\nfrom {paths[n]['timed_answer_tokens']} tokens)"
                                       if paths[n]["extrapolated"] else "")
        ax.annotate(note, (i, bottom[i]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds per sequence")
    ax.set_ylim(0, max(bottom) * 1.25)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


# ---- memory plan ------------------------------------------------------------------------------
def count_params(config: PretrainedConfig, factory, lora_dim: int) -> tuple[int, int]:
    """(parameters of the model, LoRA parameters added on its layers' linears), counted on the meta device."""
    with torch.device("meta"):
        model = factory(config)
    lora = sum(lora_dim * (m.in_features + m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and LORA_MODULES in n)
    return sum(p.numel() for p in model.parameters()), lora


def model_sizes(args: argparse.Namespace) -> dict:
    """Parameters of the actor and of the critic (= reward model), and the LoRA parameters each adds."""
    actor_config, reward_config = MODELS[args.model](), MODELS[args.reward_model]()
    reward_config.num_labels = 1
    actor, actor_lora = count_params(actor_config, AutoModelForCausalLM.from_config, args.lora_dim)
    critic, critic_lora = count_params(reward_config, AutoModelForSequenceClassification.from_config, args.lora_dim)
    return {"actor": actor, "actor_lora": actor_lora, "critic": critic, "critic_lora": critic_lora,
            "actor_config": actor_config}


def resident_bytes(args: argparse.Namespace, n: dict, path: str, tp: int) -> dict[str, float]:
    """What a rank holds through the whole run: the shards of the trained models and their optimizers;
    the frozen reference and reward model as ZeRO-3 shards, or on our path in the inference layout at
    tp (one copy: where oneDNN packs the dtype the packed one, hybrid_engine.scoring)."""
    w, b = args.world, DTYPES[args.dtype].itemsize
    trained_actor, trained_critic = (n["actor_lora"], n["critic_lora"]) if args.lora_dim else (n["actor"], n["critic"])
    opt = 16 if b == 2 else 12
    critic_free = args.algorithm != "ppo"
    frozen_ranks = tp if path.startswith("hybrid") else w
    return {"runtime (torch, DeepSpeed, gloo)": 0.6 * GIB,
            "actor + critic shards": (n["actor"] + n["actor_lora"]) * b / w
            + (0 if critic_free else (n["critic"] + n["critic_lora"]) * b / w),
            "reference + reward model": (n["actor"] + n["critic"]) * b / frozen_ranks,
            "actor optimizer": trained_actor * opt / w,
            "critic optimizer": 0 if critic_free else trained_critic * opt / w}


def phase_bytes(args: argparse.Namespace, n: dict, path: str, tp: int) -> dict[str, float]:
    """What each phase adds on top: generation (by path), experience and training."""
    b, config, g = DTYPES[args.dtype].itemsize, n["actor_config"], args.samples
    h, layers, seq = config.hidden_size, config.num_hidden_layers, args.prompt_len + args.answer_len
    tokens = args.batch * seq  # per training mini-batch (--batch rows)
    kv_per_token = 2 * layers * h * b
    kv = kv_per_token * args.batch * g * seq  # G copies of each prompt
    kv_forked = kv_per_token * args.batch * (args.prompt_len + g * args.answer_len)
    layer_activations = tokens * (34 * h + 5 * config.num_attention_heads * seq) * b / 2
    activations = (layers * tokens * h * b + layer_activations if args.gradient_checkpointing
                   else layers * layer_activations)
    per_logit = b + 8  # the logits, their fp32 copy and logsumexp's fp32 exponentials (or the gradient)
    logits = args.batch * (args.answer_len + 1) * config.vocab_size * per_logit
    copies = 2 if prepack.available(torch.device("cpu"), DTYPES[args.dtype]) else 1  # weights (+ prepacked copies)
    generation = {"ds_chat": kv + 2 * 5e7 * b,  # KV cache + DeepSpeed's prefetch buckets
                  "gather_once": n["actor"] * b + kv,  # the plain model
                  "hybrid_engine": copies * n["actor"] * b / tp + kv_forked / tp}
    # the experience forwards run on all G answers of the batch at once, without gradients
    return {"generation": generation["hybrid_engine" if path.startswith("hybrid") else path],
            "experience": g * (logits + layer_activations),
            "training": activations + logits + ZERO3_STEP * n["actor"] * b}


CACHE_PART = f"CPU cache (<= {CACHE_HEADROOM} x itemised, in the memory left)"


def memory_plan(args: argparse.Namespace, path: str, tp: int, available: int) -> dict[str, float]:
    """Estimated bytes per rank of one path, by part, on a machine with `available` bytes free for all ranks
    (the CPU cache gets what the rest leaves). Trained weights under ZeRO-3 in bf16 cost 2 bytes
    (partitioned) + 16 (fp32 master, Adam m and v, fp32 gradient, partitioned); frozen ones 2
    (partitioned). rlhf loads each model whole in --dtype before partitioning it."""
    n, b = model_sizes(args), DTYPES[args.dtype].itemsize
    plan = resident_bytes(args, n, path, tp)
    steady, runtime = sum(plan.values()), plan["runtime (torch, DeepSpeed, gloo)"]
    plan.update(phase_bytes(args, n, path, tp))
    # rlhf loads the actor whole before partitioning it, then the reference whole next to the actor's
    # shard and optimizer (on our path, also next to the inference slices it is converted into)
    actor = (n["actor"] + n["actor_lora"]) * b
    slices = n["actor"] * b / tp if path.startswith("hybrid") else 0
    loading = runtime + max(actor, actor / args.world + plan["actor optimizer"] + n["actor"] * b + slices)
    plan["steady + largest phase"] = steady + max(plan["generation"], plan["experience"], plan["training"])
    plan["loading peak (whole actor, reference)"] = loading
    itemised = max(loading, plan["steady + largest phase"]) - runtime
    plan["unitemised (0.1 x itemised + 1 GiB)"] = UNITEMISED * itemised + UNITEMISED_FIXED
    # importing rlhf (as this module does, and every rank) installs the cache unless HE_CPU_CACHE=0: freed
    # tensors kept for reuse, at most CACHE_HEADROOM x the live bytes' peak beyond it, and on each rank no more
    # than the memory the rest of the plan leaves (the worker sets that limit): the cache never refuses a run
    uncached = runtime + itemised + plan["unitemised (0.1 x itemised + 1 GiB)"]
    room = max(0.0, (available / args.world - uncached) // MIB * MIB)  # whole MiB: never past what is there
    plan[CACHE_PART] = min(CACHE_HEADROOM * itemised, room) if _C.cpu_cache_installed() else 0.0
    plan["peak"] = uncached + plan[CACHE_PART]
    return plan


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def check_memory(args: argparse.Namespace, paths: list[tuple[str, int]]) -> dict:
    """Print the per-rank plan of every path; refuse when a path's world of ranks would not fit."""
    available = mem_available()  # read once: the plans and the check below must see the same bytes
    plans = {name: memory_plan(args, name, tp, available) for name, tp in paths}
    parts = list(next(iter(plans.values())))
    print(f"memory plan per rank (GiB; {args.world} ranks run at a time, one path after another):")
    print_table([{"part": part, **{name: plan[part] / GIB for name, plan in plans.items()}} for part in parts],
                ["part", *plans])
    need = max(plan["peak"] for plan in plans.values()) * args.world
    print(f"largest path: {need / GIB:.1f} GiB for {args.world} ranks; available now: {available / GIB:.1f} GiB")
    if need > available and not args.ignore_memory_plan:
        raise SystemExit(f"refused: the plan needs {need / GIB:.1f} GiB and {available / GIB:.1f} GiB are available. "
                         f"{what_would_fit(args, plans)} --ignore-memory-plan runs anyway.")
    return {name: {k: v / GIB for k, v in plan.items()} for name, plan in plans.items()}


def what_would_fit(args: argparse.Namespace, plans: dict[str, dict]) -> str:
    """The options not already in effect that lower the part that sets the peak."""
    worst = max(plans, key=lambda name: plans[name]["peak"])
    plan = plans[worst]
    if plan["loading peak (whole actor, reference)"] >= plan["steady + largest phase"]:
        return ("The peak is loading: rlhf.rlhf_engine loads the actor whole on every rank before DeepSpeed "
                "partitions it, so more ranks do not help and fewer (--world 1) lose the ZeRO-3 sharding this "
                "benchmark is about; a smaller --model, or more free memory (other processes hold the rest).")
    options = [] if args.lora_dim else ["--lora-dim 128 (LoRA actor and critic)"]
    options += [] if args.gradient_checkpointing else ["--gradient-checkpointing"]
    options += [f"--batch {args.batch // 2}"] if args.batch > 1 else []
    options += [f"--tp {args.world}"] if worst.startswith("hybrid") and args.world > 1 else []
    options += [f"--paths without {worst}"]
    return f"The peak is {worst}'s; what would lower it: {', '.join(options)}."


# ---- command line -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="opt-1.3b", help="actor configuration (random weights)")
    p.add_argument("--reward-model", choices=sorted(MODELS), default="opt-350m",
                   help="reward model configuration; the critic is a copy of it")
    p.add_argument("--world", type=int, default=2, help="CPU ranks (gloo) started per path; ZeRO-3 shards over them")
    add_dtype(p, "Training and inference dtype, every path")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank, the same for every path")
    p.add_argument("--batch", type=int, default=2, help="prompts per rank per iteration (and the PPO mini-batch)")
    p.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt (DeepSpeed-Chat's setting: 256)")
    p.add_argument("--answer-len", type=int, default=256,
                   help="tokens per answer, forced on every path (DeepSpeed-Chat's setting: 256)")
    p.add_argument("--warmup-answer-len", type=int, default=None,
                   help="tokens per answer in the unmeasured warm-up iteration, which builds what a first iteration "
                        "builds (optimizer state, inference weights, communication ops) (default: --answer-len, or "
                        "32 for actors of >= 1B parameters, whose full-length warm-up costs minutes per path)")
    p.add_argument("--iterations", type=int, default=None,
                   help="measured PPO iterations per path, after one warm-up (default 2, or 1 for actors of >= 1B "
                        "parameters, whose defaults then finish within 30 minutes on 2 vCPUs)")
    add_path_flags(p)
    return p


def add_path_flags(p: argparse.ArgumentParser) -> None:
    """The algorithm, the paths and what each path does."""
    p.add_argument("--algorithm", choices=["ppo", "grpo", "rloo"], default="ppo",
                   help="ppo: actor and critic (DeepSpeed-Chat's step 3); grpo / rloo: no critic, --samples answers "
                        "per prompt with the group as the baseline")
    p.add_argument("--samples", type=int, default=None,
                   help="answers per prompt (G; default 8 for grpo/rloo, 1 for ppo)")
    p.add_argument("--paths", nargs="+", choices=["ds_chat", "gather_once", "hybrid_engine"],
                   default=["ds_chat", "gather_once", "hybrid_engine"], help="which paths to run")
    p.add_argument("--tp", type=int, nargs="+", default=None,
                   help="tensor-parallel degrees of the hybrid_engine path (default 1, or --world when the memory "
                        "plan of tp 1 does not fit, said when it happens)")
    p.add_argument("--slow-answer-len", type=int, default=None,
                   help="time ds_chat's generation on this many tokens (and 1) and extrapolate it to --answer-len; "
                        "marked in every output (default: 16 for actors of >= 1B parameters, else the full length)")
    p.add_argument("--lora-dim", type=int, default=None,
                   help="LoRA rank of actor and critic with --only_optimize_lora (0: train every weight; default 128 "
                        "for actors of >= 1B parameters, which do not fit trained in full next to the other models)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the actor and critic backward (default: on for actors >= 1B)")
    p.add_argument("--old-logprobs-from", choices=OLD_LOGPROBS_FROM, default="auto",
                   help="the hybrid_engine path's rlhf --old_logprobs_from: the actor's logprobs of its answers as "
                        "sampled or by the training model (auto: as sampled in fp32)")
    p.add_argument("--seed", type=int, default=1234, help="seed of weights, prompts and sampling")
    p.add_argument("--ignore-memory-plan", action="store_true", help="run even when the memory plan does not fit")
    p.add_argument("--out", default=None, help="JSON path (default results/e2e-<model>-<world>.json); the PNG goes "
                                               "next to it")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    parse_dtype(p, args)
    large = count_params(MODELS[args.model](), AutoModelForCausalLM.from_config, 0)[0] >= 1e9
    args.iterations = (1 if large else 2) if args.iterations is None else args.iterations
    for name in ("world", "threads", "batch", "prompt_len", "answer_len", "iterations"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.answer_len < 2:
        p.error("--answer-len must be >= 2 (PPO drops answers of one token)")
    try:
        args.samples = samples_per_prompt(args.algorithm, args.samples, "--samples")
    except ValueError as e:
        p.error(str(e))
    args.lora_dim = (128 if large else 0) if args.lora_dim is None else args.lora_dim
    args.gradient_checkpointing = large if args.gradient_checkpointing is None else args.gradient_checkpointing
    answer_part(p, args, "warmup_answer_len", 32 if large else None)
    answer_part(p, args, "slow_answer_len", 16 if large else None)
    if args.slow_answer_len == args.answer_len:
        args.slow_answer_len = None
    if args.tp is not None:
        check_tp(p, args.world, args.tp)
    return args


def answer_part(p: argparse.ArgumentParser, args: argparse.Namespace, name: str, default: int | None) -> None:
    """A flag counting some of an answer's tokens: by default `default` (capped) or the whole answer,
    and always in [2, --answer-len]."""
    value = getattr(args, name)
    if value is None:
        value = args.answer_len if default is None else min(default, args.answer_len)
    if not 2 <= value <= args.answer_len:
        p.error(f"--{name.replace('_', '-')} must be in [2, --answer-len={args.answer_len}], got {value}")
    setattr(args, name, value)


def choose_tp(args: argparse.Namespace) -> list[int]:
    if args.tp is not None:
        return args.tp
    if "hybrid_engine" not in args.paths or args.world == 1:
        return [1]
    available = mem_available()
    tp1, split = (memory_plan(args, "hybrid_engine", tp, available)["peak"] for tp in (1, args.world))
    if tp1 * args.world <= available or split >= tp1:  # fits, or splitting would not help
        return [1]
    print(f"--tp 1 does not fit the memory available (its plan is below); hybrid_engine runs with --tp {args.world}")
    return [args.world]


def path_list(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(name, tp) of each path to run; hybrid_engine once per --tp."""
    paths = [(p, 1) for p in args.paths if p != "hybrid_engine"]
    if "hybrid_engine" in args.paths:
        paths += [("hybrid_engine" if i == 0 else f"hybrid_engine_tp{tp}", tp) for i, tp in enumerate(args.tp)]
    return paths


def describe(args: argparse.Namespace) -> str:
    algorithm = args.algorithm + (f", {args.samples} answers per prompt" if args.samples > 1 else "")
    return f"{algorithm}: actor {args.model}, reward/critic {args.reward_model}"


def print_setup(args: argparse.Namespace) -> None:
    training = f"LoRA dim {args.lora_dim} (only LoRA trained)" if args.lora_dim else "full-parameter training"
    print(f"{describe(args)}, {args.dtype}, ZeRO-3 on {args.world} ranks, {args.threads} torch thread(s) per rank; "
          f"per rank: batch {args.batch}, prompt {args.prompt_len}, answer {args.answer_len} (forced); {training}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; 1 warm-up (answer "
          f"{args.warmup_answer_len}) + {args.iterations} iterations per path; load average {os.getloadavg()[0]:.2f}")


def run_paths(args: argparse.Namespace, paths: list[tuple[str, int]], plans: dict) -> dict[str, dict]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as root:
        checkpoints = write_checkpoints(args, root)
        for name, tp in paths:
            cache_bytes = plans[name][CACHE_PART] * GIB
            ranks = run_ranks(args.world, worker, args, name, tp, checkpoints, cache_bytes, threads=args.threads)
            results[name] = summarize(ranks, args, name, tp)
            results[name]["memory_plan_gib_per_rank"] = plans[name]["peak"]
            results[name]["load_average_after"] = os.getloadavg()
    add_ratios(results)
    return results


def print_results(args: argparse.Namespace, results: dict[str, dict]) -> None:
    print(f"\n{describe(args)}, {args.world} ranks x batch {args.batch}, prompt {args.prompt_len} + answer "
          f"{args.answer_len}; median of {args.iterations} iterations, slowest rank (seconds; x_*: speed-up against "
          f"that baseline; tokens/s over all ranks; load average {os.getloadavg()[0]:.2f})")
    columns = ["path", "generation_s", "reshard_s", "gather_s", "experience_s", "training_s", "iteration_s",
               "gen_s/seq", "exp_s/seq", "tra_s/seq", "tokens/s", "gen_x_ds_chat", "iter_x_ds_chat",
               "gen_x_gather_once", "iter_x_gather_once", "peak_rss_gib", "extrapolated", "old_logprobs"]
    print_table(table_rows(results), columns)
    print("peak_rss_gib: VmHWM of each rank over its whole life (loading included); generation_s includes reshard_s "
          "and gather_s; old_logprobs: the actor's logprobs recorded as sampled (generation) or by a forward of the "
          "training model in the experience phase (training)")
    rows, columns = phase_rows(results)
    print("\nper phase: seconds (slowest rank, median), % of that path's iteration, x: the baseline's seconds over the "
          "path's")
    print_table(rows, columns)
    for title, key, scale, digits in (("peak RSS, GiB (the largest over the measured iterations)", "peak_rss_bytes",
                                       GIB, 2), ("CPU seconds, user + system", "cpu_s", 1, 2),
                                      ("minor page faults, thousands", "minor_faults", 1e3, 0)):
        print(f"\nper phase and rank: {title}; each phase measured from its own start")
        print_table(usage_rows(results, key, scale, digits), ["phase", *results])
    print_prompt_kv(results)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.tp = choose_tp(args)
    paths = path_list(args)
    env = {**print_environment(args.dtype), "torch_threads_per_rank": args.threads, "load_average": os.getloadavg()}
    print_setup(args)
    plans = check_memory(args, paths)
    results = run_paths(args, paths, plans)
    print_results(args, results)
    suffix = "" if args.algorithm == "ppo" else f"-{args.algorithm}"
    out = args.out or f"results/e2e-{args.model}-{args.world}{suffix}.json"
    config = {**vars(args), "paths_run": [n for n, _ in paths], "environment": env, "memory_plan_gib": plans}
    write_json(out, {"config": config, "paths": results})
    plot(results, f"{args.algorithm}: {args.model} actor + {args.reward_model} reward, {args.world} CPU ranks, "
                  f"ZeRO-3, {args.dtype}, prompt {args.prompt_len} + answer {args.answer_len}",
         str(Path(out).with_suffix(".png")))


if __name__ == "__main__":
    main()
