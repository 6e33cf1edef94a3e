"""Plain-torch reference implementations of the fused ops: the oracle for tests and benchmarks.

Shapes and names are the contract of hybrid_engine.kernels. Computation is in float32 and the
result is cast back to the input dtype.
"""
import math

import torch
import torch.nn.functional as F

ACTIVATIONS = {
    "none": lambda x: x,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    keep = slots >= 0
    block_size = k_cache.shape[1]
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    k_cache[blocks, offsets] = key[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[keep].to(v_cache.dtype)


def copy_blocks(k_cache: torch.Tensor, v_cache: torch.Tensor, copies: torch.Tensor) -> None:
    for src, dst in copies.tolist():
        k_cache[dst] = k_cache[src]
        v_cache[dst] = v_cache[src]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
               window: int | None = None) -> torch.Tensor:
    """q [Tq, H, D], k/v [Tk, KVH, D]; causal aligns the last query with the last key; a window
    (sliding-window attention, causal only) hides keys window or more positions behind the query."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if causal:
        tq, tk = q.shape[0], k.shape[0]
        behind = torch.arange(tq, device=q.device)[:, None] + (tk - tq) - torch.arange(tk, device=q.device)
        hidden = (behind < 0) | (behind >= window) if window is not None else behind < 0
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, *,
                      causal: bool = True, scale: float | None = None, window: int | None = None) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        out[start:end] = _attention(q[start:end], k[start:end], v[start:end], causal, scale, window).to(q.dtype)
    return out


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """The first context_len tokens of one sequence from a paged cache: [context_len, KVH, D]."""
    num_blocks = -(-context_len // cache.shape[1])
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:context_len]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, *, scale: float | None = None,
                     window: int | None = None) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.empty_like(q)
    for b, context_len in enumerate(context_lens.tolist()):
        k = gather_kv(k_cache, block_tables[b], context_len)
        v = gather_kv(v_cache, block_tables[b], context_len)
        out[b] = _attention(q[b : b + 1], k, v, True, scale, window)[0].to(q.dtype)
    return out


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    return ACTIVATIONS[activation](F.linear(x.float(), weight.float(), None if bias is None else bias.float())).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    out = F.layer_norm(new_residual.float(), new_residual.shape[-1:], weight.float(),
                       None if bias is None else bias.float(), eps)
    return out.to(x.dtype), new_residual


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    h = new_residual.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    return out.to(x.dtype), new_residual
