"""The arithmetic of RLHF step 3: log-probabilities, per-token rewards, GAE, whitening, the clipped
actor and critic losses and the EMA of the actor (PPO); group advantages, the k3 KL and the group
policy loss of the critic-free GRPO and RLOO. Engines and the training loop live
elsewhere; everything here is a pure function of tensors (RunningMoments holds plain floats).

Conventions (DeepSpeed-Chat's defaults, names as CleanRL and "The N implementation details of RLHF
with PPO" use them). Every per-token tensor is [B, T] over the same positions; action_mask [B, T]
(bool) is True on the answer tokens whose log-probabilities are trained. Positions before the answer
(prompt, left padding) and after it (EOS padding) are False, and answers are ragged: each row ends at
its own last True. Outputs are 0 wherever action_mask is False, so a caller can sum without masking.

Where we differ from DeepSpeed-Chat's ppo_trainer.py, and why:
- It adds the score at index `start + action_mask[:, start:].sum(1)` (ppo_trainer.compute_rewards),
  which assumes the mask is one contiguous run from the prompt end and, unless the answer fills the
  row, is the first padding position after the answer, not its last token; we add it at each row's
  last answer token (the last True of its mask).
- Its GAE runs over every position from `start` to the end of the padded batch (rewards and values
  zeroed after `ends`, again off by one); ours steps over answer tokens only, bootstrapping from the
  next *answer* token's value and from 0 after the last one, so padding never enters an advantage.
- Its masked means multiply by the mask, so a nan/inf in a padded position (e.g. a log-probability of
  a pad token) poisons the loss and its gradient; we select with torch.where.
- It has no whitening, reward normalisation, clip fractions or approximate KL; we return them.
"""
from dataclasses import dataclass
from typing import Sequence

import torch

from rlhf.reward_model import end_index


def _check_mask(action_mask: torch.Tensor) -> None:
    if action_mask.dtype != torch.bool:
        raise ValueError(f"action_mask must be a bool tensor, got {action_mask.dtype}")
    if action_mask.dim() != 2:
        raise ValueError(f"action_mask must be [B, T], got shape {tuple(action_mask.shape)}")
    empty = (~action_mask.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"action_mask has no answer token in rows {empty}")


def _check_like(action_mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Every per-token tensor must have the mask's [B, T] shape; name the first that does not."""
    _check_mask(action_mask)
    for name, x in tensors.items():
        if x.shape != action_mask.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, action_mask {tuple(action_mask.shape)}")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the True positions of the whole batch (token-level, as DeepSpeed-Chat and TRL);
    torch.where rather than x * mask so that nan/inf at masked positions cannot leak in."""
    return torch.where(mask, x, 0).sum() / mask.sum()


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance over the True positions, as TRL's whiten uses."""
    centred = torch.where(mask, x - masked_mean(x, mask), 0)
    count = mask.sum()
    return centred.square().sum() / (count - 1).clamp(min=1)


def logprobs_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(labels) under logits [..., V] -> [...] in fp32. Equal to gathering log_softmax, but
    logsumexp needs no second [..., V] fp32 tensor, and bf16 logits would lose the small differences
    between policy and reference that the KL penalty and the ratio are made of."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, logits {tuple(logits.shape)} (want logits[..., V])")
    logits = logits.float()
    taken = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    return taken - logits.logsumexp(-1)


def compute_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                    action_mask: torch.Tensor, kl_ctl: float = 0.1, clip_reward_value: float = 5.0) -> torch.Tensor:
    """Per-token rewards [B, T]: the KL penalty -kl_ctl * (logprobs - ref_logprobs) on every answer
    token, plus the reward model's score, clipped to [-clip_reward_value, clip_reward_value], at each
    row's last answer token (the score judges the whole answer, so it arrives when the answer ends)."""
    _check_like(action_mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    if scores.shape != action_mask.shape[:1]:
        raise ValueError(f"scores has shape {tuple(scores.shape)}, want [B] = [{action_mask.shape[0]}]")
    kl = logprobs.detach().float() - ref_logprobs.detach().float()
    rewards = torch.where(action_mask, -kl_ctl * kl, 0)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    clipped = scores.detach().float().clamp(-clip_reward_value, clip_reward_value)
    rewards[rows, end_index(action_mask)] += clipped
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, backwards over the answer tokens of each row: the next value
    is the next answer token's, and 0 after the last (the episode ends with the answer). Returns
    (advantages, returns) with returns = advantages + values; both are targets, so no gradient."""
    _check_like(action_mask, rewards=rewards, values=values)
    rewards, values = rewards.detach().float(), values.detach().float()
    advantages = torch.zeros_like(values)
    next_value = lastgaelam = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        answer = action_mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gaelam = delta + gamma * lam * lastgaelam
        # Off-answer positions carry the running state past them unchanged (padding, prompt, holes).
        lastgaelam = torch.where(answer, gaelam, lastgaelam)
        next_value = torch.where(answer, values[:, t], next_value)
        advantages[:, t] = torch.where(answer, gaelam, 0)
    return advantages, torch.where(action_mask, advantages + values, 0)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise x to unit variance over the masked positions (advantage whitening); with
    shift_mean=False the mean is kept, as for rewards, whose sign carries meaning."""
    _check_like(mask, x=x)
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(mask, whitened if shift_mean else whitened + mean, 0)


@dataclass
class RunningMoments:
    """Running mean and variance of reward-model scores (for reward normalisation), merged batch by
    batch with Chan et al.'s parallel formula; plain floats so that a checkpoint can hold them."""
    mean: float = 0.0
    var: float = 1.0
    count: int = 0

    def update(self, scores: torch.Tensor) -> None:
        scores = scores.detach().double().flatten()
        n, batch_mean, batch_var = scores.numel(), scores.mean().item(), scores.var(correction=0).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    def normalize(self, scores: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
        centred = scores - self.mean if shift_mean else scores
        return centred / (self.var + eps) ** 0.5


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, cliprange: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-token pessimistic surrogate max(-A * ratio, -A * clip(ratio)), and where the clipped
    term is the one taken (TRL's pg_clipfrac)."""
    ratio = log_ratio.exp()
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    return torch.max(pg_losses, pg_losses_clipped), pg_losses_clipped > pg_losses


def actor_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               mask: torch.Tensor, cliprange: float = 0.2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, masked mean over answer tokens. Returns (loss, clipfrac, approx_kl);
    the gradient flows through logprobs only (old_logprobs and advantages are data of the rollout).
    approx_kl is the k3 estimator (ratio - 1) - log ratio of CleanRL, non-negative and unbiased."""
    _check_like(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    # Zero padding before any arithmetic: a nan there would come back as nan * 0 in the backward pass.
    log_ratio = torch.where(mask, logprobs.float() - old_logprobs.detach().float(), 0)
    advantages = torch.where(mask, advantages.detach().float(), 0)
    losses, clipped = clipped_surrogate(log_ratio, advantages, cliprange)
    loss = masked_mean(losses, mask)
    with torch.no_grad():
        clipfrac = masked_mean(clipped.float(), mask)
        approx_kl = masked_mean(log_ratio.exp() - 1 - log_ratio, mask)
    return loss, clipfrac, approx_kl


def group_advantages(scores: torch.Tensor, group_size: int, baseline: str = "mean", scale_by_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """One advantage per answer, [B * G] for G answers per prompt in rows b * G + k (transformers'
    order). baseline "mean": GRPO's r - mean of the group, divided by the group's standard deviation
    + eps (unbiased, as TRL) unless scale_by_std is False (Dr. GRPO); "leave_one_out": RLOO's r - mean
    of the other G - 1 answers. A group whose answers scored alike gets zeros (no signal)."""
    if group_size < 2 or scores.dim() != 1 or scores.numel() % group_size:
        raise ValueError(f"scores must be [B * G] with G = group_size >= 2, got shape {tuple(scores.shape)} "
                         f"and group_size {group_size}")
    if baseline not in ("mean", "leave_one_out"):
        raise ValueError(f"baseline must be 'mean' or 'leave_one_out', got {baseline!r}")
    groups = scores.detach().float().view(-1, group_size)
    if baseline == "leave_one_out":
        return (groups - (groups.sum(1, keepdim=True) - groups) / (group_size - 1)).flatten()
    advantages = groups - groups.mean(1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (groups.std(1, keepdim=True) + eps)
    return advantages.flatten()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate exp(ref - logp) - (ref - logp) - 1 (Schulman's k3,
    GRPO's), non-negative; 0 off the mask. The gradient flows through logprobs."""
    _check_like(mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    delta = torch.where(mask, ref_logprobs.detach().float() - logprobs.float(), 0)
    return delta.exp() - delta - 1


def group_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      advantages: torch.Tensor, mask: torch.Tensor, cliprange: float = 0.2, kl_coef: float = 0.04,
                      per_sequence: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO/RLOO's loss: the clipped surrogate with each answer's advantage [B] on all its tokens, plus
    kl_coef * k3 KL to the reference as a loss term (not in the reward). Averaged over all answer
    tokens of the batch, or per answer then over answers (per_sequence, GRPO's paper). Returns
    (loss, clipfrac, mean k3 KL)."""
    _check_like(mask, logprobs=logprobs, old_logprobs=old_logprobs)
    if advantages.shape != mask.shape[:1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, want [B] = [{mask.shape[0]}]")
    log_ratio = torch.where(mask, logprobs.float() - old_logprobs.detach().float(), 0)
    per_token_advantages = torch.where(mask, advantages.detach().float()[:, None], 0)
    losses, clipped = clipped_surrogate(log_ratio, per_token_advantages, cliprange)
    kl = k3_kl(logprobs, ref_logprobs, mask)
    losses = torch.where(mask, losses + kl_coef * kl, 0)
    if per_sequence:
        loss = (losses.sum(1) / mask.sum(1)).mean()
    else:
        loss = losses.sum() / mask.sum()
    with torch.no_grad():
        return loss, masked_mean(clipped.float(), mask), masked_mean(kl, mask)


def critic_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                mask: torch.Tensor, cliprange_value: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss as DeepSpeed-Chat: 0.5 * max((v - R)^2, (v_clipped - R)^2), masked mean,
    where v_clipped stays within cliprange_value of the rollout's value (a trust region for the
    critic). Returns (loss, clipfrac): the fraction of tokens where the clipped error was taken."""
    _check_like(mask, values=values, old_values=old_values, returns=returns)
    # Zero padding before any arithmetic: a nan there would come back as nan * 0 in the backward pass.
    values, old_values, returns = (torch.where(mask, x.float(), 0)
                                   for x in (values, old_values.detach(), returns.detach()))
    # clamp(values, ...) rather than old + clamp(values - old): inside the range it returns values
    # bit for bit, so rounding cannot count an unclipped token as clipped.
    values_clipped = values.clamp(old_values - cliprange_value, old_values + cliprange_value)
    vf_losses = (values - returns).square()
    vf_losses_clipped = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.max(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((vf_losses_clipped > vf_losses).float(), mask)
    return loss, clipfrac


@torch.no_grad()
def ema_update(ema_params: Sequence[torch.Tensor], params: Sequence[torch.Tensor], beta: float = 0.992) -> None:
    """ema <- beta * ema + (1 - beta) * param, in place, tensor by tensor (under ZeRO-3 the caller
    gathers both sides first). lerp_ in the EMA's own dtype, as DeepSpeed-Chat's moving_average."""
    if len(ema_params) != len(params):
        raise ValueError(f"ema_params has {len(ema_params)} tensors, params {len(params)}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    for i, (ema, param) in enumerate(zip(ema_params, params)):
        if ema.shape != param.shape:
            raise ValueError(f"ema_params[{i}] has shape {tuple(ema.shape)}, params[{i}] {tuple(param.shape)}")
        ema.lerp_(param.to(ema.dtype), 1.0 - beta)
