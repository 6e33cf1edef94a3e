"""Whole-sequence forwards without a KV cache, for models that score sequences and never extend them
(RLHF's frozen reference and reward models): the log-probability of given tokens, and a value head at
each sequence's last token, on the inference layout and kernels.

The rows of a padded batch are packed back to back, so no padding token is computed, and each row
attends only to its own tokens (the varlen prefill kernel); nothing is written to a KV cache. Under
tensor parallelism every rank of the group runs one forward over the group's rows and keeps its own,
as HybridEngine generates.

    ref = Scorer(from_hf(reference))
    ref_logprobs = ref.token_logprobs(sequences, attention_mask, answer_width)   # [B, answer_width]
    reward = Scorer(from_hf(body, config), value_head=score.weight)
    scores = reward.end_values(sequences, attention_mask)                       # [B]
"""
import copy
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybrid_engine.models import CausalLM, from_hf, prepack
from hybrid_engine.models.layers import AttentionBatch

MAX_TOKENS = 8192  # packed tokens per forward: bounds the activations whatever the batch
LOGITS_BYTES = 256 << 20  # float32 logits per LM-head chunk (a vocabulary of 151936 takes 0.6 MiB a row)


@dataclass
class PackedRows:
    """The real tokens of a padded batch, row after row, and the packed tokens whose outputs are wanted."""
    input_ids: torch.Tensor   # int64 [T]
    positions: torch.Tensor   # int64 [T]: position within its row (padding skipped)
    cu_seqlens: torch.Tensor  # int32 [B + 1]
    select: torch.Tensor      # int64 [N]: indices into the T tokens


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, wanted: torch.Tensor) -> PackedRows:
    """Tokens where attention_mask is 1 (any padding, left or right); wanted [B, L] bool marks the
    positions whose outputs are needed, which must be real tokens."""
    mask = attention_mask.bool()
    if bool((wanted & ~mask).any()):
        raise ValueError("an output was asked of a padding position")
    index = torch.full(mask.shape, -1, dtype=torch.int64, device=mask.device)
    index[mask] = torch.arange(int(mask.sum()), device=mask.device)
    cu_seqlens = torch.nn.functional.pad(mask.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    return PackedRows(input_ids[mask], (mask.cumsum(1) - 1)[mask], cu_seqlens, index[wanted])


def split_rows(rows: PackedRows, max_tokens: int) -> list[PackedRows]:
    """Consecutive whole rows of at most max_tokens tokens each (a longer row goes alone)."""
    cu, parts, first = rows.cu_seqlens.tolist(), [], 0
    while first < len(cu) - 1:
        last = first + 1
        while last < len(cu) - 1 and cu[last + 1] - cu[first] <= max_tokens:
            last += 1
        begin, end = cu[first], cu[last]
        chosen = (rows.select >= begin) & (rows.select < end)
        parts.append(PackedRows(rows.input_ids[begin:end], rows.positions[begin:end],
                                rows.cu_seqlens[first:last + 1] - begin, rows.select[chosen] - begin))
        first = last
    return parts


def group_rows(rows: PackedRows, targets: torch.Tensor | None, tp) -> tuple[PackedRows, torch.Tensor | None, slice]:
    """The TP group's rows packed into one batch with the targets of their selected tokens (one gather),
    and which of the selected outputs are this rank's."""
    if tp.size == 1:
        return rows, targets, slice(0, len(rows.select))
    parts = [None] * tp.size
    dist.all_gather_object(parts, (rows, targets), group=tp.group)
    device = rows.input_ids.device
    offsets = [0]
    for part, _ in parts:
        offsets.append(offsets[-1] + len(part.input_ids))
    before = sum(len(p.select) for p, _ in parts[:tp.rank])
    union = PackedRows(torch.cat([p.input_ids.to(device) for p, _ in parts]),
                       torch.cat([p.positions.to(device) for p, _ in parts]),
                       torch.cat([rows.cu_seqlens[:1]] + [p.cu_seqlens[1:].to(device) + o
                                                          for (p, _), o in zip(parts, offsets)]),
                       torch.cat([p.select.to(device) + o for (p, _), o in zip(parts, offsets)]))
    union_targets = None if targets is None else torch.cat([t.to(device) for _, t in parts])
    return union, union_targets, slice(before, before + len(rows.select))


class Scorer:
    """A model that only scores: log-probabilities of given tokens, and (with value_head, the [dim] or
    [1, dim] weight of a scalar head on the last hidden state) values at each row's last token.
    freeze_packed: where every product goes through oneDNN's packed weights (bf16 on a CPU that packs
    it), the linears are packed once and their plain weights freed (model.freeze_packed_weights)."""

    def __init__(self, model: CausalLM, value_head: torch.Tensor | None = None, max_tokens: int = MAX_TOKENS,
                 freeze_packed: bool = True):
        self.model, self.max_tokens = model, max_tokens
        if freeze_packed and prepack.always_used(model.device, model.dtype):
            model.freeze_packed_weights()  # faster GEMMs for the memory of one copy
        self.value_head = None if value_head is None else value_head.reshape(-1).to(model.device, model.dtype)
        if self.value_head is not None and len(self.value_head) != self.hidden_dim():
            raise ValueError(f"value_head has {len(self.value_head)} weights, the model's last hidden state "
                             f"{self.hidden_dim()}")

    @classmethod
    def from_hf(cls, model, *, dtype: torch.dtype | None = None, tp_rank: int = 0, tp_size: int = 1, tp_group=None,
                device: torch.device | str | None = None, **options) -> "Scorer":
        """From a transformers causal LM (log-probabilities), or a *ForSequenceClassification model with one
        label and no bias (values: its `score` head; no LM head is built, such a model has none). options:
        max_tokens, freeze_packed."""
        head = getattr(model, "score", None)
        placement = {"dtype": dtype, "tp_rank": tp_rank, "tp_size": tp_size, "tp_group": tp_group, "device": device}
        if head is None:
            return cls(from_hf(model, **placement), **options)
        if head.weight.shape[0] != 1 or head.bias is not None:
            raise ValueError(f"the score head must be one output without bias, got weight {tuple(head.weight.shape)}"
                             f"{' and a bias' if head.bias is not None else ''}")
        body = copy.deepcopy(model.config)
        body.tie_word_embeddings = True  # the LM head's table is the embedding's: none is allocated or loaded
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("score.")}
        return cls(from_hf(state, body, **placement), value_head=head.weight.detach(), **options)

    def hidden_dim(self) -> int:
        return self.model.output_embedding.weight.shape[1]

    @torch.no_grad()
    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int) -> torch.Tensor:
        """log p of each row's tokens in the last `width` columns given everything before them, float32
        [B, width]; 0 where the token or the one before it is padding."""
        input_ids, mask = self._check(input_ids, attention_mask)
        if not 0 < width < input_ids.shape[1]:
            raise ValueError(f"width must be in [1, {input_ids.shape[1]}) (a token before every scored one), got {width}")
        wanted = mask[:, -width:] & mask[:, -width - 1:-1]
        predictors = torch.zeros_like(mask)
        predictors[:, -width - 1:-1] = wanted
        targets = input_ids[:, -width:][wanted]
        out = torch.zeros(wanted.shape, dtype=torch.float32, device=input_ids.device)
        out[wanted] = self._outputs(input_ids, mask, predictors, targets)
        return out

    @torch.no_grad()
    def end_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The value head at each row's last real token, float32 [B]."""
        if self.value_head is None:
            raise ValueError("end_values needs a Scorer built with a value_head")
        input_ids, mask = self._check(input_ids, attention_mask)
        last = torch.zeros_like(mask)
        columns = torch.arange(mask.shape[1], device=mask.device)
        last[torch.arange(len(mask), device=mask.device), (columns * mask).argmax(1)] = True
        return self._outputs(input_ids, mask, last, None)

    def _outputs(self, input_ids: torch.Tensor, mask: torch.Tensor, wanted: torch.Tensor,
                 targets: torch.Tensor | None) -> torch.Tensor:
        """Log-probabilities of targets (or values without targets) at the wanted positions, row-major."""
        rows, targets, mine = group_rows(pack_rows(input_ids, mask, wanted), targets, self.model.tp)
        hidden = torch.cat([self._hidden(part) for part in split_rows(rows, self.max_tokens)])
        if targets is None:
            return (hidden[mine] @ self.value_head).float()
        rows = max(1, LOGITS_BYTES // (4 * self.model.output_embedding.weight.shape[0]))
        return torch.cat([self.model.token_logprobs(h, t) for h, t in zip(hidden.split(rows), targets.split(rows))]
                         )[mine]

    def _hidden(self, rows: PackedRows) -> torch.Tensor:
        batch = AttentionBatch(cu_seqlens=rows.cu_seqlens)
        return self.model(rows.input_ids, rows.positions, batch, None, select=rows.select)

    def _check(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be an integer tensor [batch, length], got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}")
        mask = attention_mask.to(self.model.device).bool()
        if not bool(mask.any(1).all()):
            raise ValueError("attention_mask has an all-padding row")
        input_ids = input_ids.to(self.model.device, torch.int64)
        tokens = input_ids[mask]
        if bool(((tokens < 0) | (tokens >= self.model.vocab_size)).any()):
            raise ValueError(f"input_ids holds token ids outside [0, vocab_size={self.model.vocab_size})")
        if int((mask.cumsum(1)).max()) > self.model.max_positions:
            raise ValueError(f"a row has more than the model's {self.model.max_positions} positions")
        return input_ids, mask
