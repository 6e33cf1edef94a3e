"""The experience forwards of step 3 over [B, P + A] sequences (left-padded prompts, answers padded
after EOS): log-probabilities of the answer tokens and values, by a transformers model on the padded
batch. The frozen models (reference and reward model) sit behind one interface, token_logprobs and
end_values, met by two classes:

  PaddedScorer                    the transformers model (a ZeRO-3 DeepSpeed inference engine when its
                                  trained twin is ZeRO-3) on the padded batch, as DeepSpeed-Chat scores;
  hybrid_engine.scoring.Scorer    the model converted once into the inference layout at the hybrid
                                  engine's TP degree: packed forwards, no padding computed, no gathers.
"""
import torch
from torch import nn

from hybrid_engine.engine import unwrap
from rlhf.ppo_math import logprobs_of
from rlhf.reward_model import reward_scores, token_values


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (transformers' LLaMA-family forwards do not infer them)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def answer_logprobs(model: nn.Module, seq: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
    """log p of the last `width` tokens of seq under model, [B, width], LM head on those positions only."""
    logits = model(input_ids=seq, attention_mask=attention_mask, position_ids=positions(attention_mask),
                   logits_to_keep=width + 1).logits[:, :-1]
    return logprobs_of(logits, seq[:, -width:])


def answer_values(critic: nn.Module, seq: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
    """The critic's value of each answer token's state (the position that predicts it), [B, width]."""
    return token_values(critic, seq, attention_mask)[:, -width - 1:-1]


class PaddedScorer:
    """A frozen transformers causal LM (the reference) or sequence-classification model (the reward model)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def token_logprobs(self, seq: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
        return answer_logprobs(self.model, seq, attention_mask, width)

    def end_values(self, seq: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return reward_scores(unwrap(self.model), seq, attention_mask)
