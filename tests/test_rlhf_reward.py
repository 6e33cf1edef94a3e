"""Reward model: DeepSpeed-Chat's pairwise loss against a pair-by-pair loop, end scores, the
transformers checkpoint's own pooling, and the DeepSpeed-Chat checkpoint loader."""
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, OPTConfig, OPTModel

from rlhf.reward import parse_args
from rlhf.reward_model import (end_index, last_token_loss, load_dschat_reward, pairwise_loss, reward_scores,
                               token_values)

PAD = 0


def ragged_pairs(gen: torch.Generator) -> tuple[list[list[int]], list[list[int]]]:
    """Pairs sharing prefixes of every length: divergence at the first token, mid-way, one answer a
    prefix of the other, different and equal lengths, and an identical pair."""
    chosen, rejected = [], []
    for shared, extra_c, extra_r in [(0, 5, 3), (4, 3, 6), (6, 0, 2), (5, 3, 0), (3, 4, 4), (2, 1, 7), (7, 0, 0)]:
        prefix = torch.randint(1, 50, (shared,), generator=gen).tolist()
        c_tail = torch.randint(1, 50, (extra_c,), generator=gen).tolist()
        r_tail = torch.randint(1, 50, (extra_r,), generator=gen).tolist()
        if c_tail and r_tail and c_tail[0] == r_tail[0]:
            r_tail[0] = c_tail[0] % 49 + 1  # the pair must differ right after the shared prefix
        chosen.append(prefix + c_tail)
        rejected.append(prefix + r_tail)
    return chosen, rejected


def pad_pairs(chosen: list[list[int]], rejected: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = chosen + rejected
    length = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return ids, mask


def reference_pairwise(values: torch.Tensor, chosen: list[list[int]], rejected: list[list[int]]) -> float:
    """DeepSpeed-Chat's loop, pair by pair in Python floats; an identical pair scores its last token."""
    total = 0.0
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        vc, vr = values[i].tolist(), values[len(chosen) + i].tolist()
        end = max(len(c), len(r))
        start = next((j for j in range(end) if j >= len(c) or j >= len(r) or c[j] != r[j]), end - 1)
        terms = [math.log1p(math.exp(-(vc[j] - vr[j]))) for j in range(start, end)]
        total += sum(terms) / len(terms)
    return total / len(chosen)


def test_pairwise_loss_matches_loop():
    gen = torch.Generator().manual_seed(0)
    chosen, rejected = ragged_pairs(gen)
    ids, mask = pad_pairs(chosen, rejected)
    values = torch.randn(ids.shape, generator=gen, dtype=torch.float64) * 2
    assert pairwise_loss(values, ids, mask).item() == pytest.approx(reference_pairwise(values, chosen, rejected),
                                                                    rel=1e-6)


def test_pairwise_loss_gradient_only_inside_window():
    gen = torch.Generator().manual_seed(1)
    chosen, rejected = ragged_pairs(gen)
    ids, mask = pad_pairs(chosen, rejected)
    values = torch.randn(ids.shape, generator=gen, requires_grad=True)
    pairwise_loss(values, ids, mask).backward()
    # pair 1: a shared prefix of 4 tokens, chosen 7 tokens, rejected 10: the window is [4, 10)
    assert (values.grad[1, :4] == 0).all() and (values.grad[1, 4:10] != 0).all()
    assert (values.grad[1 + 7, :4] == 0).all() and (values.grad[1 + 7, 4:10] != 0).all()


def test_last_token_loss_matches_loop():
    gen = torch.Generator().manual_seed(2)
    chosen, rejected = ragged_pairs(gen)
    ids, mask = pad_pairs(chosen, rejected)
    values = torch.randn(ids.shape, generator=gen, dtype=torch.float64)
    expected = sum(math.log1p(math.exp(-(values[i, len(c) - 1] - values[len(chosen) + i, len(r) - 1]).item()))
                   for i, (c, r) in enumerate(zip(chosen, rejected))) / len(chosen)
    assert last_token_loss(values, mask).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("left", [False, True])
def test_end_index_from_mask(left):
    lengths = [3, 7, 1, 5]
    width = 8
    rows = [[0] * (width - n) + [1] * n if left else [1] * n + [0] * (width - n) for n in lengths]
    expected = [width - 1] * 4 if left else [n - 1 for n in lengths]
    assert end_index(torch.tensor(rows)).tolist() == expected


def tiny_config() -> OPTConfig:
    return OPTConfig(vocab_size=53, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, ffn_dim=40,
                     max_position_embeddings=32, word_embed_proj_dim=24, pad_token_id=PAD, num_labels=1)


def test_transformers_pooling_equals_end_scores():
    """from_pretrained alone gives the reward: its logit at the last non-pad token is our end score."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config()).eval()
    chosen, rejected = ragged_pairs(torch.Generator().manual_seed(3))
    ids, mask = pad_pairs(chosen, rejected)
    with torch.no_grad():
        ours = reward_scores(model, ids, mask)
        theirs = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs)


class DSChatRewardModel(nn.Module):
    """The layout of DeepSpeed-Chat's step-2 RewardModel (its state dict only)."""
    def __init__(self, config: OPTConfig):
        super().__init__()
        self.rwtransformer = OPTModel(config)
        self.v_head = nn.Linear(config.word_embed_proj_dim, 1, bias=False)


class Planted:
    pass


def test_load_dschat_reward(tmp_path):
    torch.manual_seed(1)
    config = tiny_config()
    theirs = DSChatRewardModel(config).eval()
    torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin")
    config.save_pretrained(tmp_path)
    ours = load_dschat_reward(str(tmp_path / "pytorch_model.bin"), str(tmp_path)).eval()
    ids, mask = pad_pairs(*ragged_pairs(torch.Generator().manual_seed(4)))
    with torch.no_grad():
        hidden = theirs.rwtransformer(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = theirs.v_head(hidden).squeeze(-1)
        torch.testing.assert_close(token_values(ours, ids, mask), expected)
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask).logits.squeeze(-1),
                                   expected.gather(1, end_index(mask)[:, None]).squeeze(1))


def test_load_dschat_reward_refuses_pickles(tmp_path):
    state = DSChatRewardModel(tiny_config()).state_dict()
    state["planted"] = Planted()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unpickling"):
        load_dschat_reward(str(tmp_path / "pytorch_model.bin"), tiny_config())
    torch.save({"weight": torch.ones(2)}, tmp_path / "other.bin")
    with pytest.raises(ValueError, match="rwtransformer"):
        load_dschat_reward(str(tmp_path / "other.bin"), tiny_config())


def test_reward_flags():
    args = parse_args(["--data_path", "d", "--model-name-or-path", "m", "--output_dir", "o",
                       "--reward-loss", "last_token", "--num-padding-at-beginning", "0"])
    assert args.reward_loss == "last_token" and args.num_padding_at_beginning == 0
    assert parse_args(["--data_path", "d", "--model_name_or_path", "m", "--output_dir", "o"]).reward_loss == "pairwise"
