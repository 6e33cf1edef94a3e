"""Residual add fused with LayerNorm or RMSNorm (one kernel, RMS as a constexpr switch).

    h = x + residual            (rounded to the input dtype: it is the next layer's residual)
    LayerNorm: out = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias
    RMSNorm:   out = h / sqrt(mean(h^2) + eps) * weight

One program normalises one row held whole in registers (BLOCK >= hidden size), statistics in
float32. Without a residual, h is x itself and nothing extra is written.
"""
import torch
import triton
import triton.language as tl

from hybrid_engine.kernels.triton import unit_stride


@triton.jit
def _add_norm_kernel(x_ptr, residual_ptr, weight_ptr, bias_ptr, out_ptr, new_residual_ptr, x_stride,
                     residual_stride, out_stride, new_residual_stride, eps, HIDDEN: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    h = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(residual_ptr + row * residual_stride + cols, mask=mask,
                                         other=0.0).to(tl.float32)).to(h.dtype)
        tl.store(new_residual_ptr + row * new_residual_stride + cols, h, mask=mask)
    h = h.to(tl.float32)
    if RMS:
        centred = h
    else:
        centred = tl.where(mask, h - tl.sum(h, axis=0) / HIDDEN, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / HIDDEN + eps)
    out = centred * rstd * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def add_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
             eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., N]; weight, bias [N]."""
    x2 = unit_stride(x.reshape(-1, x.shape[-1]))
    rows, hidden = x2.shape
    out = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    residual2 = None if residual is None else unit_stride(residual.reshape(rows, hidden))
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
    new_residual = x2 if residual is None else torch.empty_like(out)
    block = triton.next_power_of_2(hidden)
    _add_norm_kernel[(rows,)](
        x2, residual2, weight, bias, out, new_residual, x2.stride(0), 0 if residual2 is None else residual2.stride(0),
        out.stride(0), new_residual.stride(0), eps, HIDDEN=hidden, HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None, RMS=rms, BLOCK=block, num_warps=min(max(block // 256, 1), 16))
    return out.view(x.shape), x if residual is None else new_residual.view(x.shape)
