"""Step 3's PPO trainer, in DeepSpeed-Chat's shape: generate_experience(prompt_batch) -> experience,
train_rlhf(experience) -> (actor_loss, critic_loss), train_unsupervised(batch) -> ptx_loss.

Per-token tensors of an experience are [B, A] over the answer region of the sequences: column j is
the token at position P + j (P = padded prompt width), predicted from position P - 1 + j, so the
models' LM heads run on the answer region only. action_mask[b, j] is True on row b's own answer
tokens (EOS included, padding after it excluded); every answer starts at column 0.
"""
import argparse
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from hybrid_engine.engine import unwrap
from hybrid_engine.memory import return_freed_memory, status_bytes
from rlhf.ds import all_sum
from rlhf.ppo_math import (RunningMoments, actor_loss, compute_rewards, critic_loss, ema_update, gae,
                           group_advantages, group_policy_loss, logprobs_of, masked_mean, whiten)
from rlhf.reward_model import reward_scores, token_values
from rlhf.rlhf_engine import RLHFEngine
from rlhf.sft import token_nll


TRIM_BYTES = 256 << 20


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (transformers' LLaMA-family forwards do not infer them)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def answer_lengths(answers: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """New tokens per row of transformers' generate output (up to and including the first EOS)."""
    is_eos = answers == eos_token_id
    return torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, answers.shape[1])


def sequence_masks(prompt_mask: torch.Tensor, lengths: torch.Tensor, answer_width: int):
    """(attention_mask [B, P + A] for the forwards, action_mask [B, A] bool of the answer tokens)."""
    action_mask = torch.arange(answer_width, device=lengths.device)[None] < lengths[:, None]
    return torch.cat([prompt_mask, action_mask.long()], 1), action_mask


def answer_logprobs(model: nn.Module, seq: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
    """log p of the last `width` tokens of seq under model, [B, width], LM head on those positions only."""
    logits = model(input_ids=seq, attention_mask=attention_mask, position_ids=positions(attention_mask),
                   logits_to_keep=width + 1).logits[:, :-1]
    return logprobs_of(logits, seq[:, -width:])


def answer_values(critic: nn.Module, seq: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
    """The critic's value of each answer token's state (the position that predicts it), [B, width]."""
    return token_values(critic, seq, attention_mask)[:, -width - 1:-1]


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition, or the whole tensor."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of x, concatenated in rank order (ranks may hold different numbers)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts)


def minibatches(args: argparse.Namespace) -> int:
    """PPO mini-batches per generation batch: its G answers per prompt in --per_device_training_batch_size rows."""
    rows = args.per_device_generation_batch_size * args.num_samples_per_prompt
    return -(-rows // args.per_device_training_batch_size)


def all_ranks_agree(flag: bool) -> bool:
    """True only if flag is True on every rank (one all-reduce)."""
    return all_sum(float(not flag))[0] == 0


class PPOTrainer:
    def __init__(self, engine: RLHFEngine, args: argparse.Namespace):
        self.engine, self.args = engine, args
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.generator = torch.Generator().manual_seed(args.seed + 7919 * self.rank)  # answers differ by rank
        self.moments = RunningMoments()
        self.group, self.minibatches = args.num_samples_per_prompt, minibatches(args)
        self.times: dict[str, float] = {}
        self.stats: dict[str, float] = {}   # of the last generate_experience
        self.metrics: list[dict] = []       # one per train_rlhf call, emptied by the caller
        if engine.actor_ema is not None:
            self.ema_pairs = self._ema_pairs()

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
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start

    # ---- experience -----------------------------------------------------------------------------
    def generate_sequence(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sequences [B * G, P + A], new tokens per row [B * G]) sampled from the actor; row b * G + k is
        answer k to prompt b (G: samples, default --num_samples_per_prompt)."""
        a, tok = self.args, self.engine.tokenizer
        options = dict(max_new_tokens=a.max_answer_seq_len, min_new_tokens=a.min_answer_seq_len,
                       do_sample=a.do_sample, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       num_return_sequences=samples or self.group, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
        if self.engine.hybrid is not None:
            return self._generate_hybrid(input_ids, attention_mask, options)
        return self._generate_hf(input_ids, attention_mask, options)

    def _generate_hybrid(self, input_ids, attention_mask, options):
        hybrid = self.engine.hybrid
        with self.phase("reshard"):
            hybrid.eval()
        try:
            out = hybrid.generate(input_ids, attention_mask, generator=self.generator, **options)
            self.stats.update({f"kv_{k}": float(v) for k, v in hybrid.generator.stats.items() if "blocks" in k})
            cache = hybrid.generator.cache
            self.stats["kv_block_bytes"] = float(cache.k[:, 0].nbytes + cache.v[:, 0].nbytes)
        finally:
            hybrid.train()  # inference weights and KV cache go back before training
        return out.sequences, out.generated_lengths

    def _generate_hf(self, input_ids, attention_mask, options):
        actor = self.engine.actor
        zero3 = actor.zero_optimization_stage() == 3 and dist.is_initialized() and dist.get_world_size() > 1
        seq = actor.module.generate(input_ids=input_ids, attention_mask=attention_mask, synced_gpus=zero3,
                                    **options)
        answers = seq[:, input_ids.shape[1]:]
        return seq, answer_lengths(answers, options["eos_token_id"])

    @torch.no_grad()
    def generate_experience(self, prompt_batch: dict) -> dict | None:
        """Answers and everything the algorithm needs of them. PPO drops answers of at most one token;
        the group algorithms keep groups whole (and may drop those without signal). None (on every
        rank) when some rank has fewer answers left than mini-batches: the ranks train in step."""
        e, device = self.engine, self.engine.actor.device
        input_ids, prompt_mask = prompt_batch["input_ids"].to(device), prompt_batch["attention_mask"].to(device)
        self.times, self.stats = {}, {}
        e.actor.eval()
        try:
            return self._experience(input_ids, prompt_mask)
        finally:
            e.actor.train()

    def _experience(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> dict | None:
        e = self.engine
        with self.phase("generation"):
            seq, lengths = self.generate_sequence(input_ids, prompt_mask)
        prompt_mask = prompt_mask.repeat_interleave(self.group, 0)
        keep = lengths > 1 if e.critic is not None else torch.ones_like(lengths, dtype=torch.bool)
        self.stats.update(dropped_answers=float((~keep).sum()), answers=float(len(keep)))
        if not all_ranks_agree(int(keep.sum()) >= self.minibatches):
            return None
        width = int(lengths[keep].max())  # columns after the longest kept answer are padding on every row
        seq, lengths, prompt_mask = seq[keep, :input_ids.shape[1] + width], lengths[keep], prompt_mask[keep]
        attention_mask, action_mask = sequence_masks(prompt_mask, lengths, width)
        with self.phase("experience"):
            logprobs = answer_logprobs(e.actor, seq, attention_mask, width)
            ref_logprobs = answer_logprobs(e.ref, seq, attention_mask, width)
            scores = reward_scores(unwrap(e.reward), seq, attention_mask)
            exp = {"seq": seq, "attention_mask": attention_mask, "action_mask": action_mask, "logprobs": logprobs,
                   "ref_logprobs": ref_logprobs, "scores": scores}
            if e.critic is not None:
                exp["values"] = answer_values(unwrap(e.critic), seq, attention_mask, width)
        if self.args.normalize_reward:
            self.moments.update(gather_rows(scores))
        return exp if e.critic is not None else self._with_group_advantages(exp)

    def _with_group_advantages(self, exp: dict) -> dict | None:
        """Each answer's advantage from its group's scores; groups without signal counted (and dropped)."""
        a, groups = self.args, exp["scores"].view(-1, self.group)
        baseline = "leave_one_out" if a.algorithm == "rloo" else "mean"
        exp["advantages"] = group_advantages(exp["scores"], self.group, baseline, a.scale_by_std)
        zero_std = groups.max(1).values == groups.min(1).values
        self.stats["frac_reward_zero_std"] = zero_std.float().mean().item()
        if not a.drop_zero_std_groups:
            return exp
        keep = (~zero_std).repeat_interleave(self.group)
        if not all_ranks_agree(int(keep.sum()) >= self.minibatches):
            return None
        return {k: v[keep] for k, v in exp.items()}

    # ---- training -------------------------------------------------------------------------------
    def advantages_and_returns(self, exp: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rewards, advantages, returns): KL-penalised per-token rewards, GAE, options applied."""
        a, mask = self.args, exp["action_mask"]
        scores = exp["scores"]
        if a.normalize_reward:
            scores = self.moments.normalize(scores, shift_mean=False)
        rewards = compute_rewards(exp["logprobs"], exp["ref_logprobs"], scores, mask, a.kl_ctl, a.clip_reward_value)
        advantages, returns = gae(rewards, exp["values"], mask, a.gamma, a.lam)
        if a.whiten_advantages:
            advantages = whiten(advantages, mask)
        return rewards, advantages, returns

    def train_rlhf(self, exp: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One actor step and one critic step on an experience mini-batch: (actor_loss, critic_loss);
        critic_loss is None for the critic-free algorithms."""
        if self.engine.critic is None:
            return self._train_group(exp), None
        a, e, mask = self.args, self.engine, exp["action_mask"]
        seq, attention_mask, width = exp["seq"], exp["attention_mask"], mask.shape[1]
        with torch.no_grad():
            rewards, advantages, returns = self.advantages_and_returns(exp)
        with self.phase("actor_training"):
            logprobs = answer_logprobs(e.actor, seq, attention_mask, width)
            loss, clipfrac, approx_kl = actor_loss(logprobs, exp["logprobs"], advantages, mask, a.cliprange)
            e.actor.backward(loss)
            e.actor.step()
            self.update_ema()
        with self.phase("critic_training"):
            values = answer_values(unwrap(e.critic), seq, attention_mask, width)
            vf_loss, vf_clipfrac = critic_loss(values, exp["values"], returns, mask, a.cliprange_value)
            e.critic.backward(vf_loss)
            e.critic.step()
        self._record(exp, rewards, advantages, loss, clipfrac, approx_kl, vf_loss, vf_clipfrac)
        return loss.detach(), vf_loss.detach()

    def _train_group(self, exp: dict) -> torch.Tensor:
        a, actor, mask = self.args, self.engine.actor, exp["action_mask"]
        with self.phase("actor_training"):
            logprobs = answer_logprobs(actor, exp["seq"], exp["attention_mask"], mask.shape[1])
            loss, clipfrac, kl = group_policy_loss(logprobs, exp["logprobs"], exp["ref_logprobs"], exp["advantages"],
                                                   mask, a.cliprange, a.kl_coef, a.loss_averaging == "sequence")
            actor.backward(loss)
            actor.step()
            self.update_ema()
        self.metrics.append({"actor_loss": loss.item(), "actor_clipfrac": clipfrac.item(), "kl_k3": kl.item(),
                             "advantage_abs_mean": exp["advantages"].abs().mean().item()})
        return loss.detach()

    def train_unsupervised(self, batch: dict, unsup_coef: float) -> torch.Tensor:
        """PTX: an actor step on unsup_coef times the language-model loss of a block of plain text."""
        actor = self.engine.actor
        with self.phase("ptx_training"):
            ids, mask = batch["input_ids"].to(actor.device), batch["attention_mask"].to(actor.device)
            nll, count = token_nll(actor(input_ids=ids, attention_mask=mask).logits,
                                   ids.masked_fill(mask == 0, -100))
            loss = nll / count.clamp(min=1)
            actor.backward(unsup_coef * loss)
            actor.step()
            self.update_ema()
        return loss.detach()

    def _ema_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ema, actor = unwrap(self.engine.actor_ema), unwrap(self.engine.actor)
        ema_names, names = [n for n, _ in ema.named_parameters()], [n for n, _ in actor.named_parameters()]
        if ema_names != names:
            raise RuntimeError(f"the EMA's parameters differ from the actor's: {ema_names[:3]}... vs {names[:3]}...")
        return list(zip(ema.parameters(), actor.parameters()))

    def update_ema(self) -> None:
        """ema <- beta * ema + (1 - beta) * actor on the shards each rank holds: both models are
        partitioned alike under ZeRO-3, so no parameter is gathered (DeepSpeed-Chat gathers each)."""
        if self.engine.actor_ema is None:
            return
        with self.phase("ema"):
            ema_update(self.ema_shards(), [local_shard(q) for _, q in self.ema_pairs], self.args.ema_beta)

    def ema_shards(self) -> list[torch.Tensor]:
        """What this rank holds of the EMA (what a checkpoint saves); empty without --enable_ema."""
        return [local_shard(p) for p, _ in self.ema_pairs] if self.engine.actor_ema is not None else []

    def _record(self, exp, rewards, advantages, loss, clipfrac, approx_kl, vf_loss, vf_clipfrac) -> None:
        mask = exp["action_mask"]
        self.metrics.append({"actor_loss": loss.item(), "critic_loss": vf_loss.item(), "actor_clipfrac": clipfrac.item(),
                             "critic_clipfrac": vf_clipfrac.item(), "approx_kl": approx_kl.item(),
                             "advantage_mean": masked_mean(advantages, mask).item(),
                             "return_mean": rewards.sum(1).mean().item()})
