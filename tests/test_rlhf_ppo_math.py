"""rlhf.ppo_math against direct loop-by-loop references in plain Python (nested loops over rows and
tokens, floats, no vectorisation) on random tensors with ragged answer masks."""
import math

import pytest
import torch

from rlhf.ppo_math import (RunningMoments, actor_loss, compute_rewards, critic_loss, ema_update, gae,
                           group_advantages, group_policy_loss, k3_kl, logprobs_of, whiten)

# Rows: prompt then answer then padding; an answer of one token; an answer filling the row; an answer
# running to the end after a prompt; and (second mask) an answer with a hole, as packing could make.
CONTIGUOUS = [
    "..AAAA...",
    "A........",
    "AAAAAAAAA",
    "...AAAAAA",
    ".AAA.....",
]
WITH_HOLE = CONTIGUOUS[:4] + [".AAA.A..."]


def make_mask(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "A" for c in row] for row in rows])


@pytest.fixture(params=[CONTIGUOUS, WITH_HOLE], ids=["contiguous", "with_hole"])
def mask(request) -> torch.Tensor:
    return make_mask(request.param)


def randn_padded(mask: torch.Tensor, scale: float = 1.0, pad: float = float("nan")) -> torch.Tensor:
    """Random values on answer tokens, `pad` elsewhere: a function that reads padding fails loudly."""
    return torch.where(mask, torch.randn(mask.shape, dtype=torch.float64) * scale, pad)


def answer_positions(mask_row: list[bool]) -> list[int]:
    return [t for t, answer in enumerate(mask_row) if answer]


def test_logprobs_of_matches_loop():
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 11) * 4).bfloat16()
    labels = torch.randint(0, 11, (3, 5))
    got = logprobs_of(logits, labels)
    assert got.dtype == torch.float32
    rows, ids = logits.float().tolist(), labels.tolist()
    for b in range(3):
        for t in range(5):
            row = rows[b][t]
            top = max(row)
            lse = top + math.log(sum(math.exp(x - top) for x in row))
            assert got[b, t].item() == pytest.approx(row[ids[b][t]] - lse, abs=1e-5)


def ref_rewards(logprobs, ref_logprobs, scores, mask, kl_ctl, clip):
    out = []
    for b, mask_row in enumerate(mask):
        last = answer_positions(mask_row)[-1]
        row = []
        for t, answer in enumerate(mask_row):
            r = -kl_ctl * (logprobs[b][t] - ref_logprobs[b][t]) if answer else 0.0
            if t == last:
                r += min(max(scores[b], -clip), clip)
            row.append(r)
        out.append(row)
    return out


@pytest.mark.parametrize("kl_ctl,clip", [(0.1, 5.0), (0.3, 1.5)])
def test_compute_rewards_matches_loop(mask, kl_ctl, clip):
    torch.manual_seed(1)
    logprobs, ref_logprobs = randn_padded(mask, pad=7.0), randn_padded(mask, pad=-3.0)
    scores = torch.tensor([9.0, -0.7, 1.2, -12.0, 0.4], dtype=torch.float64)  # some beyond the clip
    got = compute_rewards(logprobs, ref_logprobs, scores, mask, kl_ctl=kl_ctl, clip_reward_value=clip)
    want = ref_rewards(logprobs.tolist(), ref_logprobs.tolist(), scores.tolist(), mask.tolist(), kl_ctl, clip)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def ref_gae(rewards, values, mask, gamma, lam):
    advantages, returns = [], []
    for b, mask_row in enumerate(mask):
        adv, ret = [0.0] * len(mask_row), [0.0] * len(mask_row)
        steps = answer_positions(mask_row)
        lastgaelam = 0.0
        for k in reversed(range(len(steps))):
            t = steps[k]
            next_value = values[b][steps[k + 1]] if k + 1 < len(steps) else 0.0
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            lastgaelam = delta + gamma * lam * lastgaelam
            adv[t], ret[t] = lastgaelam, lastgaelam + values[b][t]
        advantages.append(adv)
        returns.append(ret)
    return advantages, returns


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.7)])
def test_gae_matches_loop(mask, gamma, lam):
    torch.manual_seed(2)
    rewards, values = randn_padded(mask, pad=0.0), randn_padded(mask, pad=5.0)
    values.requires_grad_(True)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert not advantages.requires_grad and not returns.requires_grad
    want_adv, want_ret = ref_gae(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(advantages, torch.tensor(want_adv, dtype=torch.float32))
    torch.testing.assert_close(returns, torch.tensor(want_ret, dtype=torch.float32))


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_loop(mask, shift_mean):
    torch.manual_seed(3)
    x = randn_padded(mask, scale=3.0) + 2.0
    got = whiten(x, mask, shift_mean=shift_mean)
    taken = [v for row, m in zip(x.tolist(), mask.tolist()) for v, a in zip(row, m) if a]
    mean = sum(taken) / len(taken)
    std = math.sqrt(sum((v - mean) ** 2 for v in taken) / (len(taken) - 1) + 1e-8)
    want = [[((v - mean) / std + (0.0 if shift_mean else mean)) if a else 0.0 for v, a in zip(row, m)]
            for row, m in zip(x.tolist(), mask.tolist())]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_running_moments_match_all_scores():
    torch.manual_seed(4)
    batches = [torch.randn(n) * 2 + 1 for n in (5, 1, 8)]
    moments = RunningMoments()
    for batch in batches:
        moments.update(batch)
    everything = [v for batch in batches for v in batch.tolist()]
    mean = sum(everything) / len(everything)
    var = sum((v - mean) ** 2 for v in everything) / len(everything)
    assert (moments.mean, moments.var, moments.count) == (pytest.approx(mean), pytest.approx(var), 14)
    x = torch.tensor([0.5, -3.0], dtype=torch.float64)
    torch.testing.assert_close(moments.normalize(x), (x - mean) / math.sqrt(var + 1e-8))
    torch.testing.assert_close(moments.normalize(x, shift_mean=False), x / math.sqrt(var + 1e-8))


def ref_actor_loss(logprobs, old_logprobs, advantages, mask, cliprange):
    total = clipped = kl = 0.0
    count = 0
    for b, mask_row in enumerate(mask):
        for t in answer_positions(mask_row):
            log_ratio = logprobs[b][t] - old_logprobs[b][t]
            ratio = math.exp(log_ratio)
            loss1 = -advantages[b][t] * ratio
            loss2 = -advantages[b][t] * min(max(ratio, 1 - cliprange), 1 + cliprange)
            total += max(loss1, loss2)
            clipped += loss2 > loss1
            kl += (ratio - 1) - log_ratio
            count += 1
    return total / count, clipped / count, kl / count


def rollout(mask: torch.Tensor, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Old quantities and new ones `spread` away: wide enough that some ratios leave [0.8, 1.2]."""
    old = randn_padded(mask)
    return old + randn_padded(mask, scale=spread), old


@pytest.mark.parametrize("cliprange", [0.2, 0.1])
def test_actor_loss_matches_loop(mask, cliprange):
    torch.manual_seed(5)
    logprobs, old_logprobs = rollout(mask, spread=0.3)
    advantages = randn_padded(mask)
    loss, clipfrac, approx_kl = actor_loss(logprobs, old_logprobs, advantages, mask, cliprange=cliprange)
    want = ref_actor_loss(logprobs.tolist(), old_logprobs.tolist(), advantages.tolist(), mask.tolist(), cliprange)
    assert 0 < clipfrac.item() < 1, "clipping must be engaged in some tokens and not all"
    assert (loss.item(), clipfrac.item(), approx_kl.item()) == pytest.approx(want, rel=1e-5)


def test_actor_loss_gradient_flows_through_logprobs_only(mask):
    torch.manual_seed(6)
    new, old = rollout(mask, spread=0.3)
    logprobs, old_logprobs, advantages = (x.float().requires_grad_(True) for x in (new, old, randn_padded(mask)))
    loss, clipfrac, approx_kl = actor_loss(logprobs, old_logprobs, advantages, mask)
    loss.backward()
    assert old_logprobs.grad is None and advantages.grad is None
    assert not clipfrac.requires_grad and not approx_kl.requires_grad
    # d loss / d logprob = -A * ratio / n where the unclipped term is taken, 0 where clipping binds.
    ratio, adv, n = (new - old).exp(), advantages.detach().double(), mask.sum().item()
    unclipped = -adv * ratio >= -adv * ratio.clamp(0.8, 1.2)
    want = torch.where(mask & unclipped, -adv * ratio / n, 0.0)
    torch.testing.assert_close(logprobs.grad.double(), want, rtol=1e-4, atol=1e-7)
    assert (logprobs.grad[mask] != 0).any() and (logprobs.grad[mask] == 0).any()


def ref_critic_loss(values, old_values, returns, mask, cliprange):
    total = clipped = 0.0
    count = 0
    for b, mask_row in enumerate(mask):
        for t in answer_positions(mask_row):
            v, old, ret = values[b][t], old_values[b][t], returns[b][t]
            v_clipped = min(max(v, old - cliprange), old + cliprange)
            loss1, loss2 = (v - ret) ** 2, (v_clipped - ret) ** 2
            total += max(loss1, loss2)
            clipped += loss2 > loss1
            count += 1
    return 0.5 * total / count, clipped / count


@pytest.mark.parametrize("cliprange_value", [0.2, 0.5])
def test_critic_loss_matches_loop(mask, cliprange_value):
    torch.manual_seed(7)
    values, old_values = rollout(mask, spread=0.4)
    returns = randn_padded(mask)
    values.requires_grad_(True)
    loss, clipfrac = critic_loss(values, old_values, returns, mask, cliprange_value=cliprange_value)
    want = ref_critic_loss(values.tolist(), old_values.tolist(), returns.tolist(), mask.tolist(), cliprange_value)
    assert 0 < clipfrac.item() < 1, "value clipping must be engaged in some tokens and not all"
    assert (loss.item(), clipfrac.item()) == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert values.grad[~mask].eq(0).all() and values.grad[mask].ne(0).any()


def test_ema_update_matches_formula():
    torch.manual_seed(8)
    params = [torch.randn(3, 5), torch.randn(7), torch.randn(2, 1, 3).bfloat16()]
    ema_params = [torch.randn_like(p, dtype=torch.float32) for p in params]
    before = [e.clone() for e in ema_params]
    params_before = [p.clone() for p in params]
    pointers = [e.data_ptr() for e in ema_params]
    ema_update(ema_params, params, beta=0.9)
    for ema, old, param, param_before, ptr in zip(ema_params, before, params, params_before, pointers):
        assert ema.data_ptr() == ptr, "the EMA must be updated in place"
        torch.testing.assert_close(param, param_before)
        want = [0.9 * e + 0.1 * p for e, p in zip(old.flatten().tolist(), param.float().flatten().tolist())]
        torch.testing.assert_close(ema.flatten(), torch.tensor(want))


def bad_inputs():
    mask = make_mask(CONTIGUOUS)
    x, scores = torch.randn(mask.shape), torch.randn(5)
    empty_row = mask.clone()
    empty_row[1] = False
    return [
        (lambda: compute_rewards(x, x, scores, mask.long()), "action_mask must be a bool"),
        (lambda: gae(x, x, empty_row), r"no answer token in rows \[1\]"),
        (lambda: actor_loss(x, x, x, empty_row), r"no answer token in rows \[1\]"),
        (lambda: compute_rewards(x, x[:, :-1], scores, mask), "ref_logprobs has shape"),
        (lambda: compute_rewards(x, x, scores[:4], mask), "scores has shape"),
        (lambda: gae(x, x.T, mask), "values has shape"),
        (lambda: whiten(x[:4], mask), "x has shape"),
        (lambda: actor_loss(x, x, x[:, :3], mask), "advantages has shape"),
        (lambda: critic_loss(x, x[1:], x, mask), "old_values has shape"),
        (lambda: critic_loss(x, x, x, mask[0]), r"action_mask must be \[B, T\]"),
        (lambda: logprobs_of(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long)), "labels has shape"),
        (lambda: ema_update([x], [x, x]), "ema_params has 1 tensors, params 2"),
        (lambda: ema_update([x, x], [x, x.T]), r"ema_params\[1\] has shape"),
        (lambda: ema_update([x], [x], beta=1.5), "beta must be in"),
    ]


@pytest.mark.parametrize("call,message", bad_inputs())
def test_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- critic-free algorithms (GRPO, Dr. GRPO, RLOO) --------------------------------------------------

def ref_group_advantages(scores: list[float], group_size: int, baseline: str, scale_by_std: bool, eps: float):
    out = []
    for start in range(0, len(scores), group_size):
        group = scores[start:start + group_size]
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        for i, r in enumerate(group):
            if baseline == "leave_one_out":
                out.append(r - (sum(group) - r) / (len(group) - 1))
            else:
                out.append((r - mean) / (std + eps) if scale_by_std else r - mean)
    return out


@pytest.mark.parametrize("baseline, scale_by_std", [("mean", True), ("mean", False), ("leave_one_out", False)])
@pytest.mark.parametrize("group_size", [2, 5])
def test_group_advantages_match_loop(baseline, scale_by_std, group_size):
    torch.manual_seed(group_size)
    scores = torch.randn(4 * group_size, dtype=torch.float64) * 2
    scores[:group_size] = 0.7  # a group whose answers all scored alike: no signal
    got = group_advantages(scores, group_size, baseline, scale_by_std, eps=1e-4)
    want = ref_group_advantages(scores.tolist(), group_size, baseline, scale_by_std, 1e-4)
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert not got[:group_size].any()


def ref_group_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, cliprange, kl_coef, per_sequence):
    rows, clipped, kls, count = [], 0, 0.0, 0
    for b, mask_row in enumerate(mask):
        row = []
        for t in answer_positions(mask_row):
            ratio = math.exp(logprobs[b][t] - old_logprobs[b][t])
            loss1 = -advantages[b] * ratio
            loss2 = -advantages[b] * min(max(ratio, 1 - cliprange), 1 + cliprange)
            delta = ref_logprobs[b][t] - logprobs[b][t]
            kl = math.exp(delta) - delta - 1
            row.append(max(loss1, loss2) + kl_coef * kl)
            clipped, kls, count = clipped + (loss2 > loss1), kls + kl, count + 1
        rows.append(row)
    if per_sequence:
        loss = sum(sum(r) / len(r) for r in rows) / len(rows)
    else:
        loss = sum(sum(r) for r in rows) / count
    return loss, clipped / count, kls / count


@pytest.mark.parametrize("per_sequence", [False, True])
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
def test_group_policy_loss_matches_loop(mask, per_sequence, kl_coef):
    torch.manual_seed(9)
    logprobs, old_logprobs = rollout(mask, spread=0.3)
    ref_logprobs = old_logprobs + randn_padded(mask, scale=0.5)
    advantages = torch.randn(mask.shape[0], dtype=torch.float64)
    got = group_policy_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, 0.2, kl_coef, per_sequence)
    want = ref_group_loss(logprobs.tolist(), old_logprobs.tolist(), ref_logprobs.tolist(), advantages.tolist(),
                          mask.tolist(), 0.2, kl_coef, per_sequence)
    assert 0 < got[1].item() < 1 and got[2].item() > 0
    assert tuple(x.item() for x in got) == pytest.approx(want, rel=1e-5)


def test_k3_kl_matches_loop_and_its_gradient_flows_through_logprobs(mask):
    torch.manual_seed(2)
    logprobs = randn_padded(mask).requires_grad_()
    ref_logprobs = randn_padded(mask).requires_grad_()
    kl = k3_kl(logprobs, ref_logprobs, mask)
    for b, mask_row in enumerate(mask.tolist()):
        for t in range(len(mask_row)):
            delta = ref_logprobs[b, t].item() - logprobs[b, t].item()
            assert kl[b, t].item() == pytest.approx(math.exp(delta) - delta - 1 if mask_row[t] else 0.0, rel=1e-6, abs=1e-7)
    kl.sum().backward()
    assert torch.isfinite(logprobs.grad).all() and logprobs.grad[mask].abs().sum() > 0
    assert ref_logprobs.grad is None or not ref_logprobs.grad.any()


@pytest.mark.parametrize("call, message", [
    (lambda: group_advantages(torch.randn(7), 3), "group_size"),
    (lambda: group_advantages(torch.randn(6), 1), "group_size"),
    (lambda: group_advantages(torch.randn(6), 3, baseline="median"), "baseline"),
    (lambda: group_policy_loss(*[torch.randn(2, 3)] * 3, torch.randn(3), torch.ones(2, 3, dtype=torch.bool)),
     "advantages"),
])
def test_group_bad_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
