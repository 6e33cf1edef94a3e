"""Step 3's loop in the order it runs, as plain functions over dataclasses (CleanRL's ppo.py shape):

1. generate_experience: a batch of prompts -> G answers each from a rollout (rlhf.rollout), answers of
   at most one token dropped (PPO), then the experience forwards: actor and reference logprobs of the
   answer tokens (the actor's as they were sampled when the rollout records them, --old_logprobs_from),
   reward-model scores, critic values (PPO) or the group advantages (GRPO / RLOO).
2. train_iteration: --ppo_epochs passes over mini-batches of the experience. PPO: per-token rewards
   (KL penalty + clipped score at the last answer token), GAE advantages and returns, one actor step
   (ratio clip) and one critic step (value clip). GRPO / RLOO: one actor step on the group advantages
   with a k3 KL term. Then a PTX step on plain text when given; the EMA after every actor step.
3. run: the iterations, with the log, evaluations on held-out prompts and resumable checkpoints.

Per-token tensors of an experience are [B, A] over the answer region of the sequences: column j is
the token at position P + j (P = padded prompt width), predicted from position P - 1 + j, so the
models' LM heads run on the answer region only. action_mask[b, j] is True on row b's own answer
tokens (EOS included, padding after it excluded); every answer starts at column 0.
"""
import argparse
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist

from hybrid_engine.engine import unwrap
from hybrid_engine.memory import return_freed_memory, status_bytes
from rlhf.checkpoint import load_checkpoint, save_checkpoint
from rlhf.data.loaders import Cycle
from rlhf.distributed import all_max, all_sum, rank, world_size
from rlhf.forwards import answer_logprobs, answer_values
from rlhf.log import Log
from rlhf.ppo_args import minibatches
from rlhf.ppo_math import (RunningMoments, actor_loss, compute_rewards, critic_loss, ema_update, gae,
                           group_advantages, group_policy_loss, masked_mean, whiten)
from rlhf.rlhf_engine import RLHFEngine
from rlhf.rollout import Generate, Rollout, Sampling
from rlhf.supervised import token_nll

TRIM_BYTES = 256 << 20
SHOWN = ("reward_mean", "kl_ref", "actor_loss", "critic_loss", "time_total_s")


@dataclass(frozen=True)
class PPOConfig:
    algorithm: str           # ppo: actor + critic; grpo / rloo: critic-free, the group is the baseline
    samples: int             # G answers per prompt
    minibatches: int         # PPO mini-batches per generation batch
    sampling: Sampling
    ppo_epochs: int = 1
    kl_ctl: float = 0.1      # PPO: per-token KL penalty in the reward
    clip_reward_value: float = 5.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    whiten_advantages: bool = False
    normalize_reward: bool = False
    kl_coef: float = 0.04    # GRPO / RLOO: weight of the k3 KL loss term
    scale_by_std: bool = True
    sequence_loss: bool = False
    drop_zero_std_groups: bool = False
    ema_beta: float = 0.992
    unsup_coef: float = 27.8

    @classmethod
    def from_args(cls, args: argparse.Namespace, tokenizer) -> "PPOConfig":
        sampling = Sampling(args.max_answer_seq_len, args.min_answer_seq_len, args.do_sample, args.temperature,
                            args.top_k, args.top_p, tokenizer.eos_token_id, tokenizer.pad_token_id)
        derived = {"samples": args.num_samples_per_prompt, "minibatches": minibatches(args), "sampling": sampling,
                   "sequence_loss": args.loss_averaging == "sequence"}
        return cls(**derived, **{f.name: getattr(args, f.name) for f in fields(cls) if f.name not in derived})


@dataclass
class Experience:
    seq: torch.Tensor             # [B, P + A]
    attention_mask: torch.Tensor  # [B, P + A]
    action_mask: torch.Tensor     # bool [B, A]
    logprobs: torch.Tensor        # [B, A] under the actor that generated
    ref_logprobs: torch.Tensor    # [B, A] under the reference
    scores: torch.Tensor          # [B] reward-model score of each answer
    values: torch.Tensor | None = None      # [B, A] PPO: the critic's
    advantages: torch.Tensor | None = None  # [B] GRPO / RLOO: from the group's scores

    def rows(self, index) -> "Experience":
        return Experience(**{f.name: None if v is None else v[index] for f, v in self._items()})

    def split(self, parts: int) -> list["Experience"]:
        chunks = {f.name: [None] * parts if v is None else torch.tensor_split(v, parts) for f, v in self._items()}
        return [Experience(**{name: c[i] for name, c in chunks.items()}) for i in range(parts)]

    def _items(self):
        return [(f, getattr(self, f.name)) for f in fields(self)]


@dataclass
class LoopState:
    """What the loop carries between calls: the sampling generator, the score statistics, the EMA's
    parameter pairs, and the seconds, stats and metrics of the current iteration."""
    generator: torch.Generator
    moments: RunningMoments = field(default_factory=RunningMoments)
    ema_pairs: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str):
        """Times a phase; one that grew the process by TRIM_BYTES or more then hands what it freed back
        to the system: glibc keeps freed heap memory, so each phase would start on top of the last one's
        peak (OPT-1.3B actor, 2 ranks: 11 GiB per rank by the critic's step, 5.5 GiB after a trim). A
        trim costs milliseconds, which at tiny sizes added a sixth to test_rlhf_ppo: only when it pays."""
        start, rss = time.perf_counter(), status_bytes()
        yield
        if status_bytes() - rss >= TRIM_BYTES:
            return_freed_memory()
        self.add_time(name, time.perf_counter() - start)

    def add_time(self, name: str, seconds: float) -> None:
        self.times[name] = self.times.get(name, 0.0) + seconds


def new_state(models: RLHFEngine, seed: int) -> LoopState:
    generator = torch.Generator().manual_seed(seed + 7919 * rank())  # answers differ by rank
    return LoopState(generator, ema_pairs=ema_pairs(models) if models.actor_ema is not None else [])


# ---- 1. experience ------------------------------------------------------------------------------
def sequence_masks(prompt_mask: torch.Tensor, lengths: torch.Tensor, answer_width: int):
    """(attention_mask [B, P + A] for the forwards, action_mask [B, A] bool of the answer tokens)."""
    action_mask = torch.arange(answer_width, device=lengths.device)[None] < lengths[:, None]
    return torch.cat([prompt_mask, action_mask.long()], 1), action_mask


def all_ranks_agree(flag: bool) -> bool:
    """True only if flag is True on every rank (one all-reduce)."""
    return all_sum(float(not flag))[0] == 0


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of x, concatenated in rank order (ranks may hold different numbers)."""
    if world_size() == 1:
        return x
    parts = [None] * world_size()
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts)


def rollout_answers(rollout: Generate, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling,
                    samples: int, state: LoopState) -> Rollout:
    """A rollout's answers; its inner seconds (reshard, gather) and stats go to state."""
    out = rollout(input_ids, attention_mask, sampling, samples, state.generator)
    for name, seconds in out.times.items():
        state.add_time(name, seconds)
    state.stats.update(out.stats)
    return out


@torch.no_grad()
def generate_experience(models: RLHFEngine, rollout: Generate, prompts: dict, cfg: PPOConfig,
                        state: LoopState) -> Experience | None:
    """Answers and everything the algorithm needs of them. PPO drops answers of at most one token; the
    group algorithms keep groups whole (and may drop those without signal). None (on every rank) when
    some rank has fewer answers left than mini-batches: the ranks train in step."""
    device = models.actor.device
    input_ids, prompt_mask = prompts["input_ids"].to(device), prompts["attention_mask"].to(device)
    state.times, state.stats = {}, {}
    models.actor.eval()
    try:
        with state.phase("generation"):
            out = rollout_answers(rollout, input_ids, prompt_mask, cfg.sampling, cfg.samples, state)
        return score_answers(models, out, prompt_mask.repeat_interleave(cfg.samples, 0), cfg, state)
    finally:
        models.actor.train()


def score_answers(models: RLHFEngine, out: Rollout, prompt_mask: torch.Tensor, cfg: PPOConfig,
                  state: LoopState) -> Experience | None:
    seq, lengths = out.sequences, out.lengths
    keep = lengths > 1 if models.critic is not None else torch.ones_like(lengths, dtype=torch.bool)
    state.stats.update(dropped_answers=float((~keep).sum()), answers=float(len(keep)))
    if not all_ranks_agree(int(keep.sum()) >= cfg.minibatches):
        return None
    width = int(lengths[keep].max())  # columns after the longest kept answer are padding on every row
    prompt_width = prompt_mask.shape[1]
    seq, lengths, prompt_mask = seq[keep, :prompt_width + width], lengths[keep], prompt_mask[keep]
    attention_mask, action_mask = sequence_masks(prompt_mask, lengths, width)
    with state.phase("experience"):
        if out.logprobs is None:
            logprobs = answer_logprobs(models.actor, seq, attention_mask, width)
        else:  # as sampled (--old_logprobs_from generation): no forward of the actor
            logprobs = out.logprobs[keep, :width]
        ref_logprobs = models.ref.token_logprobs(seq, attention_mask, width)
        scores = models.reward.end_values(seq, attention_mask)
        exp = Experience(seq, attention_mask, action_mask, logprobs, ref_logprobs, scores)
        if models.critic is not None:
            exp.values = answer_values(unwrap(models.critic), seq, attention_mask, width)
    if cfg.normalize_reward:
        state.moments.update(gather_rows(exp.scores))
    return exp if models.critic is not None else with_group_advantages(exp, cfg, state)


def with_group_advantages(exp: Experience, cfg: PPOConfig, state: LoopState) -> Experience | None:
    """Each answer's advantage from its group's scores; groups without signal counted (and dropped)."""
    groups = exp.scores.view(-1, cfg.samples)
    baseline = "leave_one_out" if cfg.algorithm == "rloo" else "mean"
    exp.advantages = group_advantages(exp.scores, cfg.samples, baseline, cfg.scale_by_std)
    zero_std = groups.max(1).values == groups.min(1).values
    state.stats["frac_reward_zero_std"] = zero_std.float().mean().item()
    if not cfg.drop_zero_std_groups:
        return exp
    keep = (~zero_std).repeat_interleave(cfg.samples)
    if not all_ranks_agree(int(keep.sum()) >= cfg.minibatches):
        return None
    return exp.rows(keep)


# ---- 2. training --------------------------------------------------------------------------------
def advantages_and_returns(exp: Experience, cfg: PPOConfig, moments: RunningMoments):
    """(rewards, advantages, returns): KL-penalised per-token rewards, GAE, options applied."""
    scores = moments.normalize(exp.scores, shift_mean=False) if cfg.normalize_reward else exp.scores
    rewards = compute_rewards(exp.logprobs, exp.ref_logprobs, scores, exp.action_mask, cfg.kl_ctl,
                              cfg.clip_reward_value)
    advantages, returns = gae(rewards, exp.values, exp.action_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, exp.action_mask)
    return rewards, advantages, returns


def ppo_step(models: RLHFEngine, exp: Experience, cfg: PPOConfig, state: LoopState) -> None:
    """One actor step (ratio clip) and one critic step (value clip) on a mini-batch."""
    mask, width = exp.action_mask, exp.action_mask.shape[1]
    with torch.no_grad():
        rewards, advantages, returns = advantages_and_returns(exp, cfg, state.moments)
    with state.phase("actor_training"):
        logprobs = answer_logprobs(models.actor, exp.seq, exp.attention_mask, width)
        loss, clipfrac, approx_kl = actor_loss(logprobs, exp.logprobs, advantages, mask, cfg.cliprange)
        models.actor.backward(loss)
        models.actor.step()
        update_ema(models, cfg, state)
    with state.phase("critic_training"):
        values = answer_values(unwrap(models.critic), exp.seq, exp.attention_mask, width)
        vf_loss, vf_clipfrac = critic_loss(values, exp.values, returns, mask, cfg.cliprange_value)
        models.critic.backward(vf_loss)
        models.critic.step()
    state.metrics.append({"actor_loss": loss.item(), "critic_loss": vf_loss.item(), "actor_clipfrac": clipfrac.item(),
                          "critic_clipfrac": vf_clipfrac.item(), "approx_kl": approx_kl.item(),
                          "advantage_mean": masked_mean(advantages, mask).item(),
                          "return_mean": rewards.sum(1).mean().item()})


def group_step(models: RLHFEngine, exp: Experience, cfg: PPOConfig, state: LoopState) -> None:
    """GRPO / RLOO: one actor step on the group advantages, KL to the reference as a loss term."""
    with state.phase("actor_training"):
        logprobs = answer_logprobs(models.actor, exp.seq, exp.attention_mask, exp.action_mask.shape[1])
        loss, clipfrac, kl = group_policy_loss(logprobs, exp.logprobs, exp.ref_logprobs, exp.advantages,
                                               exp.action_mask, cfg.cliprange, cfg.kl_coef, cfg.sequence_loss)
        models.actor.backward(loss)
        models.actor.step()
        update_ema(models, cfg, state)
    state.metrics.append({"actor_loss": loss.item(), "actor_clipfrac": clipfrac.item(), "kl_k3": kl.item(),
                          "advantage_abs_mean": exp.advantages.abs().mean().item()})


def ptx_step(models: RLHFEngine, batch: dict, cfg: PPOConfig, state: LoopState) -> float:
    """PTX: an actor step on unsup_coef times the language-model loss of a block of plain text."""
    actor = models.actor
    with state.phase("ptx_training"):
        ids, mask = batch["input_ids"].to(actor.device), batch["attention_mask"].to(actor.device)
        nll, count = token_nll(actor(input_ids=ids, attention_mask=mask).logits, ids.masked_fill(mask == 0, -100))
        loss = nll / count.clamp(min=1)
        actor.backward(cfg.unsup_coef * loss)
        actor.step()
        update_ema(models, cfg, state)
    return loss.item()


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def ema_pairs(models: RLHFEngine) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ema, actor = unwrap(models.actor_ema), unwrap(models.actor)
    ema_names, names = [n for n, _ in ema.named_parameters()], [n for n, _ in actor.named_parameters()]
    if ema_names != names:
        raise RuntimeError(f"the EMA's parameters differ from the actor's: {ema_names[:3]}... vs {names[:3]}...")
    return list(zip(ema.parameters(), actor.parameters()))


def update_ema(models: RLHFEngine, cfg: PPOConfig, state: LoopState) -> None:
    """ema <- beta * ema + (1 - beta) * actor on the shards each rank holds: both models are
    partitioned alike under ZeRO-3, so no parameter is gathered (DeepSpeed-Chat gathers each)."""
    if models.actor_ema is None:
        return
    with state.phase("ema"):
        ema_update(ema_shards(state), [local_shard(q) for _, q in state.ema_pairs], cfg.ema_beta)


def ema_shards(state: LoopState) -> list[torch.Tensor]:
    """What this rank holds of the EMA (what a checkpoint saves); empty without --enable_ema."""
    return [local_shard(p) for p, _ in state.ema_pairs]


def train_iteration(models: RLHFEngine, experiences: list[Experience], unsup: Cycle | None, cfg: PPOConfig,
                    state: LoopState) -> dict:
    """--ppo_epochs passes, each an actor (and critic) step per mini-batch, plus PTX; mean metrics."""
    state.metrics, ptx = [], []
    step = ppo_step if models.critic is not None else group_step
    for _ in range(cfg.ppo_epochs):
        for exp in experiences:
            for minibatch in exp.split(cfg.minibatches):
                step(models, minibatch, cfg, state)
                if unsup is not None:
                    ptx.append(ptx_step(models, next(unsup), cfg, state))
    metrics = {k: sum(m[k] for m in state.metrics) / len(state.metrics) for k in state.metrics[0]}
    return {**metrics, **({"ptx_loss": sum(ptx) / len(ptx)} if ptx else {})}


# ---- 3. the run ---------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything run() needs besides the models: where the prompts (and PTX text) come from, how many
    iterations, the evaluation, the log, and the CLI's settings for checkpoints and printing."""
    prompts: Cycle
    unsup: Cycle | None
    total: int
    evaluate: object  # () -> dict of eval metrics
    log: Log
    args: argparse.Namespace
    step: int = 0
    reward_ema: float | None = None


def collect(models: RLHFEngine, rollout: Generate, run: Run, cfg: PPOConfig, state: LoopState):
    """--generation_batches experiences (batches some rank could not fill are skipped and logged),
    with the seconds of their phases."""
    experiences, times = [], {}
    while len(experiences) < run.args.generation_batches:
        exp = generate_experience(models, rollout, next(run.prompts), cfg, state)
        times = add_times(times, state.times)
        if exp is None:
            run.log.write("skipped", run.step, state.stats)
            continue
        experiences.append(exp)
    return experiences, times


def add_times(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a.keys() | b.keys()}


def experience_metrics(experiences: list[Experience]) -> dict:
    """Means over every answer of the iteration, on all ranks."""
    rows = sum(len(e.scores) for e in experiences)
    tokens = sum(int(e.action_mask.sum()) for e in experiences)
    score = sum(float(e.scores.sum()) for e in experiences)
    kl = sum(float(torch.where(e.action_mask, e.logprobs - e.ref_logprobs, 0).sum()) for e in experiences)
    rows, tokens, score, kl = all_sum(rows, tokens, score, kl)
    return {"reward_mean": score / rows, "kl_ref": kl / tokens, "answer_length": tokens / rows}


def iteration_metrics(models: RLHFEngine, experiences: list[Experience], times: dict, state: LoopState,
                      run: Run) -> dict:
    metrics = experience_metrics(experiences)
    reward = metrics["reward_mean"]
    run.reward_ema = reward if run.reward_ema is None else 0.9 * run.reward_ema + 0.1 * reward
    generated = sum(int(e.action_mask.sum()) for e in experiences)
    metrics.update({k: all_sum(state.stats[k])[0] / world_size() for k in
                    ("frac_reward_zero_std", "kv_peak_blocks", "kv_prompt_blocks_shared") if k in state.stats})
    metrics.update(reward_ema=run.reward_ema, dropped_answers=all_sum(state.stats["dropped_answers"])[0],
                   lr_actor=models.actor.get_lr()[0], rss_bytes_max_rank=all_max(status_bytes()),
                   tokens_per_s=all_sum(generated)[0] / max(times.get("generation", 0.0), 1e-9) / world_size(),
                   **{f"time_{k}_s": v for k, v in times.items()})
    return metrics


def run_iterations(models: RLHFEngine, rollout: Generate, run: Run, cfg: PPOConfig, state: LoopState) -> int:
    """The iterations from run.step (0, or a resumed position) to run.total; returns the last step."""
    if run.step == 0:
        run.log.eval(0, run.evaluate())
    while run.step < run.total:
        begin = time.perf_counter()
        experiences, times = collect(models, rollout, run, cfg, state)
        state.times = {}
        metrics = train_iteration(models, experiences, run.unsup, cfg, state)
        run.step += 1
        metrics.update(iteration_metrics(models, experiences, add_times(times, state.times), state, run),
                       time_total_s=time.perf_counter() - begin)
        run.log.iteration(run.step, metrics, shown=SHOWN)
        after_iteration(models, experiences, run, state)
    run.log.eval(run.step, run.evaluate())
    return run.step


def after_iteration(models: RLHFEngine, experiences: list[Experience], run: Run, state: LoopState) -> None:
    """What the flags ask for between iterations: a printed answer, an evaluation, a checkpoint."""
    args, step = run.args, run.step
    if args.print_answers and step % args.print_answers_interval == 0:
        print_answer(models.tokenizer, experiences[0])
    if args.eval_interval and step % args.eval_interval == 0 and step < run.total:
        run.log.eval(step, run.evaluate())
    if args.save_steps and step % args.save_steps == 0:
        save(models, run, state)


def print_answer(tokenizer, exp: Experience) -> None:
    seq, width = exp.seq[0], exp.action_mask.shape[1]
    answer = seq[-width:][exp.action_mask[0]]
    print(f"[rank {rank()}] prompt: {tokenizer.decode(seq[:-width], skip_special_tokens=True)!r}\n"
          f"[rank {rank()}] answer: {tokenizer.decode(answer, skip_special_tokens=True)!r} "
          f"(score {float(exp.scores[0]):.3f})", flush=True)


@torch.no_grad()
def evaluate(models: RLHFEngine, rollout: Generate, loader, cfg: PPOConfig, state: LoopState, seed: int,
             metric=None) -> dict:
    """Answers to the held-out prompts, sampled as in training from a fixed seed: mean reward-model
    score and answer length (and the metric(prompt, answer) rule), over all ranks."""
    saved = state.generator.get_state()
    state.generator.manual_seed(seed + 104729 * (rank() + 1))
    sums = torch.zeros(4, dtype=torch.float64)  # answers, score, tokens, rule
    models.actor.eval()
    for batch in loader:
        ids, mask = batch["input_ids"].to(models.actor.device), batch["attention_mask"].to(models.actor.device)
        out = rollout_answers(rollout, ids, mask, cfg.sampling, 1, state)
        seq, lengths = out.sequences, out.lengths
        attention_mask, _ = sequence_masks(mask, lengths, seq.shape[1] - ids.shape[1])
        scores = models.reward.end_values(seq, attention_mask)
        rule = sum(metric(*decode_pair(models.tokenizer, p, a[:n])) for p, a, n in
                   zip(ids, seq[:, ids.shape[1]:], lengths)) if metric else 0.0
        sums += torch.tensor([len(seq), float(scores.sum()), float(lengths.sum()), rule], dtype=torch.float64)
    models.actor.train()
    state.generator.set_state(saved)
    n, score, tokens, rule = all_sum(*sums.tolist())
    return {"reward_mean": score / n, "answer_length": tokens / n, **({"task_score": rule / n} if metric else {})}


def decode_pair(tokenizer, prompt: torch.Tensor, answer: torch.Tensor) -> tuple[str, str]:
    return tokenizer.decode(prompt, skip_special_tokens=True), tokenizer.decode(answer, skip_special_tokens=True)


# ---- checkpoints --------------------------------------------------------------------------------
def random_states(state: LoopState) -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "generator": state.generator.get_state(),
            **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def restore_random_states(state: LoopState, states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    state.generator.set_state(states["generator"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def save(models: RLHFEngine, run: Run, state: LoopState) -> None:
    position = {"prompts": (run.prompts.epoch, run.prompts.index),
                "unsup": (run.unsup.epoch, run.unsup.index) if run.unsup else None}
    saved = {"step": run.step, "reward_ema": run.reward_ema, "position": position,
             "moments": asdict(state.moments), "random": random_states(state)}
    save_checkpoint(run.args.output_dir, run.step, models, saved, ema_shards(state))


def resume(models: RLHFEngine, path: str, prompts: Cycle, unsup: Cycle | None, state: LoopState) -> dict:
    """Restore the models, data positions and state from the checkpoint at path; its step and reward_ema."""
    saved = load_checkpoint(path, models, ema_shards(state))
    prompts.restore(*saved["position"]["prompts"])
    if unsup is not None and saved["position"]["unsup"] is not None:
        unsup.restore(*saved["position"]["unsup"])
    state.moments = RunningMoments(**saved["moments"])
    restore_random_states(state, saved["random"])
    if rank() == 0:
        print(f"resumed from {path} at iteration {saved['step']}", flush=True)
    return {"step": saved["step"], "reward_ema": saved.get("reward_ema")}
