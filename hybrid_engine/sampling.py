"""Next-token choice: greedy or temperature / top-k / top-p sampling, with the same filtering rules
(and tie handling) as transformers' TopKLogitsWarper and TopPLogitsWarper."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos_token_ids: torch.Tensor  # int64 [k], possibly empty
    pad_token_id: int

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every token that top-k, then top-p (nucleus), filtering removes. [B, V] -> [B, V]."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Ascending order: remove the low tail whose mass stays within 1 - top_p; keep the top token.
        sorted_logits, order = logits.sort(dim=-1)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, options: SamplingOptions, num_generated: torch.Tensor,
                  generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] of the last positions, num_generated [B] tokens each row already has -> int64 [B]."""
    logits = logits.float()
    if options.min_new_tokens and options.eos_token_ids.numel():
        too_early = (num_generated < options.min_new_tokens)[:, None]
        eos = options.eos_token_ids
        logits[:, eos] = logits[:, eos].masked_fill(too_early, float("-inf"))
    if not options.do_sample:
        # max(dim) picks the same first maximal index as argmax, 3-10x faster in torch 2.13 on the CPU
        # ([16, 50272]: 0.4 vs 1.0 ms in float32, argmax on bf16 takes 2.6-5 ms).
        return logits.max(dim=-1).indices
    probs = filter_logits(logits / options.temperature, options.top_k, options.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
