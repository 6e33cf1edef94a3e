"""The online-softmax step shared by the attention kernels (FlashAttention-2).

Given a new tile of log2-domain scores s (masked entries -inf) and its values v, update the
running row max m, row sum l and unnormalised output acc:

    m' = max(m, max_j s_j),   p_j = 2^(s_j - m'),   alpha = 2^(m - m')
    l' = alpha l + sum_j p_j,   acc' = alpha acc + p v

The caller divides acc by l at the end. A row whose scores are all masked so far (a sliding
window can hide a whole first tile) keeps m = -inf, l = 0, acc = 0: the exponents are then taken
against 0 instead of -inf, which would give NaN.
"""
import triton
import triton.language as tl


@triton.jit
def online_softmax_step(scores, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(scores - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc
