"""Building blocks of the inference graphs: tensor-parallel linears, paged attention, MLP, norms.

Weights are buffers (no autograd) in the inference layout: packed QKV and packed gate/up are
column-parallel (each rank holds a block of output rows), the attention output projection and the
second MLP linear are row-parallel (each rank holds a block of input columns, partial sums are
all-reduced). The token embedding and the LM head are vocabulary-parallel (each rank holds a block of
vocabulary rows, as in Megatron and vLLM); norms and position embeddings are replicated.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hybrid_engine import kernels
from hybrid_engine.kernels import validate as check
from hybrid_engine.models.prepack import PackedWeight, linear


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in its tensor-parallel group."""
    rank: int = 0
    size: int = 1
    group: object = None

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tp_rank must be in [0, tp_size={self.size}), got {self.rank}")

    def divide(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tp_size={self.size}")
        return n // self.size

    def all_reduce(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, op=op, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x [..., n], concatenated along the last dim in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass
class AttentionBatch:
    """Where this forward's tokens live in the paged KV cache.

    Prefill: the tokens of several sequences packed without padding, split by cu_seqlens (int32
    [S + 1]); without slots, a forward that keeps no K/V (whole sequences scored, never extended).
    Decode: one token per sequence, attending to context_lens (int32 [B], including the new token)
    tokens found through block_tables (int32 [B, max blocks]).
    """
    slots: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None

    @property
    def is_prefill(self) -> bool:
        return self.cu_seqlens is not None

    def check_indices(self, k_cache: torch.Tensor) -> None:
        """Range checks of slots and block tables against a layer's cache, once per forward: every
        layer reuses these tensors and skips the kernels' own per-call checks (a host sync each)."""
        if self.slots is None:
            raise ValueError("a forward that writes the KV cache needs the tokens' slots")
        num_blocks, block_size = k_cache.shape[:2]
        check.check_slots(self.slots, self.slots.shape[0], num_blocks * block_size)
        if not self.is_prefill:
            check.check_block_tables(self.block_tables, self.context_lens, self.block_tables.shape[0], num_blocks,
                                     block_size)


def empty(*shape: int, like: dict) -> torch.Tensor:
    return torch.empty(*shape, dtype=like["dtype"], device=like["device"])


class Linear(nn.Module):
    """y = act(x W^T + b). A column-parallel linear is this with W holding this rank's output rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool, factory: dict):
        super().__init__()
        self.register_buffer("weight", empty(out_features, in_features, like=factory))
        self.register_buffer("bias", empty(out_features, like=factory) if bias else None)
        self.packed: PackedWeight | None = None  # set by CausalLM.prepack_weights

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        return linear(x, self.weight, self.bias, activation, self.packed)


class RowParallelLinear(Linear):
    """W holds this rank's input columns: partial products are summed over the group, then the bias
    (replicated) is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel, factory: dict):
        super().__init__(in_features, out_features, bias, factory)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        y = self.tp.all_reduce(linear(x, self.weight, None, "none", self.packed))
        return y if self.bias is None else y.add_(self.bias)


class Norm(nn.Module):
    """LayerNorm or RMSNorm fused with the residual add: returns (norm(x + residual), x + residual)."""

    def __init__(self, dim: int, eps: float, rms: bool, factory: dict):
        super().__init__()
        self.eps, self.rms = eps, rms
        self.register_buffer("weight", empty(dim, like=factory))
        self.register_buffer("bias", None if rms else empty(dim, like=factory))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rms:
            return kernels.add_rms_norm(x, residual, self.weight, self.eps)
        return kernels.add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class RotaryEmbedding:
    """Rotate-half RoPE (the Hugging Face LLaMA layout) from precomputed cos/sin tables."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float, max_positions: int, factory: dict):
        # computed on the host in fp32 whatever the default device, so every device gets the same tables
        positions = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_freq.float().cpu())
        self.cos = (freqs.cos() * attention_scaling).to(**factory)
        self.sin = (freqs.sin() * attention_scaling).to(**factory)

    def __call__(self, positions: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
        cos, sin = self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)
        out = []
        for x in xs:
            x1, x2 = x.chunk(2, dim=-1)
            out.append(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
        return out


class Attention(nn.Module):
    """Packed QKV projection, optional per-head RMSNorm of queries and keys (Qwen3; when
    qk_norm_eps is given), optional RoPE, K/V written to the paged cache, varlen prefill or paged
    decode attention (over the last `window` positions only, when given), row-parallel output
    projection."""

    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, qkv_bias: bool,
                 out_bias: bool, tp: TensorParallel, factory: dict, rotary: RotaryEmbedding | None = None,
                 qk_norm_eps: float | None = None, window: int | None = None):
        super().__init__()
        self.window = window
        self.num_heads = tp.divide(num_heads, "num_attention_heads")
        self.num_kv_heads = tp.divide(num_kv_heads, "num_key_value_heads")
        self.head_dim, self.rotary = head_dim, rotary
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv = Linear(hidden, q_size + 2 * kv_size, qkv_bias, factory)
        self.out = RowParallelLinear(q_size, hidden, out_bias, tp, factory)
        has_qk_norm = qk_norm_eps is not None
        self.q_norm = Norm(head_dim, qk_norm_eps, True, factory) if has_qk_norm else None
        self.k_norm = Norm(head_dim, qk_norm_eps, True, factory) if has_qk_norm else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch, k_cache: torch.Tensor | None,
                v_cache: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.split_sizes, dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.q_norm is not None:
            q, k = self.q_norm(q)[0], self.k_norm(k)[0]
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k)
        if k_cache is not None:
            kernels.write_kv(k, v, k_cache, v_cache, batch.slots, check_indices=False)  # checked by the model
        if batch.is_prefill:
            o = kernels.prefill_attention(q, k, v, batch.cu_seqlens, window=self.window)
        else:
            o = kernels.decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens,
                                         window=self.window, check_indices=False)
        return self.out(o.flatten(1))


class MLP(nn.Module):
    """up (column-parallel, packed [gate; up] when gated) -> activation -> down (row-parallel)."""

    def __init__(self, hidden: int, ffn: int, activation: str, gated: bool, bias: bool, tp: TensorParallel,
                 factory: dict):
        super().__init__()
        ffn = tp.divide(ffn, "intermediate size")
        self.activation, self.gated = activation, gated
        self.up = Linear(hidden, ffn * (2 if gated else 1), bias, factory)
        self.down = RowParallelLinear(ffn, hidden, bias, tp, factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down(kernels.silu_and_mul(self.up(x)))
        return self.down(self.up(x, self.activation))


class DecoderLayer(nn.Module):
    """One transformer block, pre-norm (residual carried to the next norm) or post-norm (OPT-350m)."""

    def __init__(self, attn: Attention, mlp: MLP, attn_norm: Norm, mlp_norm: Norm, pre_norm: bool):
        super().__init__()
        self.attn, self.mlp, self.attn_norm, self.mlp_norm, self.pre_norm = attn, mlp, attn_norm, mlp_norm, pre_norm

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                batch: AttentionBatch, k_cache: torch.Tensor, v_cache: torch.Tensor):
        if self.pre_norm:
            x, residual = self.attn_norm(h, residual)
            x, residual = self.mlp_norm(self.attn(x, positions, batch, k_cache, v_cache), residual)
            return self.mlp(x), residual
        h, _ = self.attn_norm(self.attn(h, positions, batch, k_cache, v_cache), h)
        h, _ = self.mlp_norm(self.mlp(h), h)
        return h, None


class Embedding(nn.Module):
    """A replicated lookup table (OPT's learned position embeddings)."""

    def __init__(self, num_embeddings: int, dim: int, factory: dict):
        super().__init__()
        self.register_buffer("weight", empty(num_embeddings, dim, like=factory))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight)


class VocabParallelEmbedding(nn.Module):
    """A token embedding or LM head split by vocabulary rows: rank r holds the rows of ids
    [r * p, (r + 1) * p), p = ceil(vocab_size / tp size); rows past the vocabulary are zero padding."""

    def __init__(self, vocab_size: int, dim: int, tp: TensorParallel, factory: dict):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        rows = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * rows
        self.register_buffer("weight", empty(rows, dim, like=factory))
        self.weight[max(0, vocab_size - self.vocab_start):].zero_()  # their logits are cut off, but finite

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, dim]: each rank looks up the ids in its rows, zeros for the others, summed."""
        if self.tp.size == 1:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        h = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(h.masked_fill_(outside.unsqueeze(-1), 0))

    def logits(self, hidden: torch.Tensor, packed: PackedWeight | None) -> torch.Tensor:
        """hidden [T, dim] -> logits [T, vocab_size] of the whole vocabulary, on every rank."""
        local = linear(hidden, self.weight, None, "none", packed)
        # Gathered rather than sampled on the shards: sampling stays one function for every option, and
        # the gather is cheap beside the GEMM it halves (16 rows of Qwen2.5's 151936, bf16, 2 ranks on
        # gloo: 6.4 ms against 139-145 ms for the whole head and 85-97 ms for half of it).
        return self.tp.all_gather(local)[:, :self.vocab_size]

    def logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, packed: PackedWeight | None) -> torch.Tensor:
        """log softmax(hidden [N, dim] @ table^T) at targets [N], float32, without gathering the logits:
        each rank reduces its own vocabulary rows, then max, sum and the target's logit are all-reduced
        (Megatron's vocabulary-parallel cross entropy; N floats cross the group, not N x vocab)."""
        rows = max(0, min(self.weight.shape[0], self.vocab_size - self.vocab_start))  # padding rows excluded
        local = linear(hidden, self.weight, None, "none", packed)[:, :rows].float()
        peak = local.amax(-1) if rows else local.new_full((len(hidden),), float("-inf"))
        peak = self.tp.all_reduce(peak, dist.ReduceOp.MAX)
        total = self.tp.all_reduce((local - peak[:, None]).exp().sum(-1))
        index = targets - self.vocab_start
        inside = (index >= 0) & (index < rows)
        taken = (local.gather(-1, index.clamp(0, max(rows - 1, 0))[:, None]).squeeze(-1) if rows
                 else torch.zeros_like(peak))
        taken = self.tp.all_reduce(taken.masked_fill(~inside, 0))
        return taken - peak - total.log()
