"""Paged decode attention, flash-decoding style (split-K over the context, then a reduction).

One new query per sequence b attends to its first context_lens[b] cached tokens, which live in
the blocks block_tables[b, :] of k_cache/v_cache [num_blocks, block_size, KVH, D]:

    out[b, h] = sum_j softmax_j(scale * q[b, h] . k[b, j]) v[b, j],   context_lens[b] - window <= j < context_lens[b]

Stage 1: program (b, kv head, split) takes the GROUP = H / KVH query heads that share one kv
head, packed as the rows of a BLOCK_G >= 16 tile so tl.dot gets tensor-core shapes, and walks
one PARTITION of the context with an online softmax. It writes the unnormalised partial output
acc_s, the running max m_s and sum l_s. Splitting the context gives a batch of one sequence
enough programs to fill a GPU.
Stage 2: program (b, h) merges the splits:  M = max_s m_s,  w_s = 2^(m_s - M),
out = sum_s w_s acc_s / sum_s w_s l_s.
"""
import torch
import triton
import triton.language as tl

from hybrid_engine.kernels.triton import dot_precision, interpreting, require_dot_dtype, unit_stride
from hybrid_engine.kernels.triton.online_softmax import online_softmax_step

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, acc_ptr, m_ptr,
                         l_ptr, qk_scale, window, q_stride_b, q_stride_h, table_stride, num_splits,
                         CACHE_BLOCK: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                         HEAD_DIM: tl.constexpr, PARTITION: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    split_start = split * PARTITION
    if split_start >= context_len:
        return
    split_end = tl.minimum(split_start + PARTITION, context_len)
    groups, dims = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + groups
    q_mask = (groups < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * q_stride_b + heads[:, None] * q_stride_h + dims[None, :], mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # Splits wholly before the window run no iteration and leave m = -inf, l = 0: weight 0 in stage 2.
    for token_start in range(tl.maximum(split_start, context_len - window), split_end, BLOCK_N):
        tokens = token_start + tl.arange(0, BLOCK_N)
        token_mask = tokens < split_end
        block = tl.load(block_tables_ptr + seq.to(tl.int64) * table_stride + tokens // CACHE_BLOCK,
                        mask=token_mask, other=0).to(tl.int64)
        rows = ((block * CACHE_BLOCK + tokens % CACHE_BLOCK) * KV_HEADS + kv_head) * HEAD_DIM
        kv_mask = token_mask[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(k_cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc, PRECISION)

    # Partials are laid out [B, H, num_splits, (D)], all float32.
    stat = (seq * KV_HEADS * GROUP + heads).to(tl.int64) * num_splits + split
    tl.store(m_ptr + stat, m_i, mask=groups < GROUP)
    tl.store(l_ptr + stat, l_i, mask=groups < GROUP)
    tl.store(acc_ptr + stat[:, None] * HEAD_DIM + dims[None, :], acc, mask=q_mask)


@triton.jit
def _decode_reduce_kernel(acc_ptr, m_ptr, l_ptr, context_lens_ptr, out_ptr, out_stride_b, out_stride_h,
                          num_heads, num_splits, HEAD_DIM: tl.constexpr, PARTITION: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    seq, head = tl.program_id(0), tl.program_id(1)
    used_splits = tl.cdiv(tl.load(context_lens_ptr + seq), PARTITION)
    splits, dims = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
    split_mask = splits < used_splits
    stat = (seq * num_heads + head).to(tl.int64) * num_splits + splits
    m = tl.load(m_ptr + stat, mask=split_mask, other=float("-inf"))
    l = tl.load(l_ptr + stat, mask=split_mask, other=0.0)
    acc = tl.load(acc_ptr + stat[:, None] * HEAD_DIM + dims[None, :],
                  mask=split_mask[:, None] & (dims < HEAD_DIM)[None, :], other=0.0)
    weight = tl.exp2(m - tl.max(m, axis=0))
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(out_ptr + seq * out_stride_b + head * out_stride_h + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float, window: int | None = None) -> torch.Tensor:
    """q [B, H, D]; contiguous caches; validated tables and lengths; window as in hybrid_engine.kernels."""
    require_dot_dtype("q", q.dtype)
    q, block_tables, context_lens = unit_stride(q), unit_stride(block_tables), context_lens.contiguous()
    batch, num_heads, head_dim = q.shape
    _, cache_block, kv_heads, _ = k_cache.shape
    # Small tiles keep the interpreter fast and still exercise several splits on short contexts.
    block_n, partition = (32, 64) if interpreting() else (64, 512)
    num_splits = triton.cdiv(block_tables.shape[1] * cache_block, partition)
    acc = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    group = num_heads // kv_heads
    block_d = triton.next_power_of_2(head_dim)
    _decode_split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, acc, m, l, scale * LOG2E, window or NO_WINDOW,
        q.stride(0), q.stride(1),
        block_tables.stride(0), num_splits, CACHE_BLOCK=cache_block, KV_HEADS=kv_heads, GROUP=group,
        HEAD_DIM=head_dim, PARTITION=partition, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d, PRECISION=dot_precision(q.dtype))
    out = torch.empty_like(q)
    _decode_reduce_kernel[(batch, num_heads)](
        acc, m, l, context_lens, out, out.stride(0), out.stride(1), num_heads, num_splits, HEAD_DIM=head_dim,
        PARTITION=partition, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d)
    return out
