"""SwiGLU gate: x [M, 2I] -> silu(x[:, :I]) * x[:, I:], computed in float32.

Program (row, block) reads BLOCK columns of the gate half and the same columns of the up half.
"""
import torch
import triton
import triton.language as tl

from hybrid_engine.kernels.triton import unit_stride


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2I]."""
    x2 = unit_stride(x.reshape(-1, x.shape[-1]))
    inter = x2.shape[1] // 2
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    block = min(triton.next_power_of_2(inter), 1024)
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
        x2, out, x2.stride(0), out.stride(0), INTER=inter, BLOCK=block)
    return out.view(*x.shape[:-1], inter)
