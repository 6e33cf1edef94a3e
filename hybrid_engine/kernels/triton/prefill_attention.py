"""Variable-length prefill attention (FlashAttention-2 forward over a packed batch).

Sequence b owns tokens [cu_seqlens[b], cu_seqlens[b+1]) of q [T, H, D] and k, v [T, KVH, D].
For query i of head h in that sequence, with kv head h // (H / KVH):

    out[i, h] = sum_j softmax_j(scale * q[i, h] . k[j]) v[j],   i - window < j <= i when causal

One program owns BLOCK_M queries of one head of one sequence and walks the keys BLOCK_N at a
time with an online softmax (running max m and sum l, float32 accumulators), so the [T, T]
score matrix is never materialised. exp2 with log2(e) folded into the scale saves a multiply.
Causal programs stop at their last query's key block and start at the key block holding the
window start of their first query (window = 2^30 when there is none).
"""
import torch
import triton
import triton.language as tl

from hybrid_engine.kernels.triton import dot_precision, require_dot_dtype, unit_stride
from hybrid_engine.kernels.triton.online_softmax import online_softmax_step

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30


@triton.jit
def _prefill_attention_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_seqlens_ptr, qk_scale, window,
                              q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                              out_stride_t, out_stride_h, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                              CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    block_m, seq, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    seqlen = tl.load(cu_seqlens_ptr + seq + 1).to(tl.int64) - start
    if block_m * BLOCK_M >= seqlen:
        return
    kv_head = head // GROUP
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_mask, dim_mask = rows < seqlen, dims < HEAD_DIM
    q = tl.load(q_ptr + (start + rows)[:, None] * q_stride_t + head * q_stride_h + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum((block_m + 1) * BLOCK_M, seqlen) if CAUSAL else seqlen
    begin = tl.maximum(block_m * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N if CAUSAL else 0
    for key_start in range(begin, end, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        kv_mask = (keys < seqlen)[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + (start + keys)[:, None] * k_stride_t + kv_head * k_stride_h + dims[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + (start + keys)[:, None] * v_stride_t + kv_head * v_stride_h + dims[None, :],
                    mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = (keys < seqlen)[None, :]
        if CAUSAL:
            visible = visible & (keys[None, :] <= rows[:, None]) & (keys[None, :] > rows[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(scores, v, m_i, l_i, acc, PRECISION)
    out = acc / tl.where(row_mask, l_i, 1.0)[:, None]  # rows past the sequence may see no key in a window
    tl.store(out_ptr + (start + rows)[:, None] * out_stride_t + head * out_stride_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
                      scale: float, window: int | None = None) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D]; validated cu_seqlens int32 [B+1]; window as in hybrid_engine.kernels."""
    require_dot_dtype("q", q.dtype)
    q, k, v, cu_seqlens = unit_stride(q), unit_stride(k), unit_stride(v), cu_seqlens.contiguous()
    out = torch.empty_like(q)
    max_seqlen = int(cu_seqlens.diff().max())
    block_m = block_n = 64
    grid = (triton.cdiv(max_seqlen, block_m), cu_seqlens.shape[0] - 1, q.shape[1])
    _prefill_attention_kernel[grid](
        q, k, v, out, cu_seqlens, scale * LOG2E, window or NO_WINDOW, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), GROUP=q.shape[1] // k.shape[1],
        HEAD_DIM=q.shape[2], CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(q.shape[2]), PRECISION=dot_precision(q.dtype))
    return out
