"""Copy runs of elements between flat buffers: dst[d_i : d_i + n_i] = src[s_i : s_i + n_i], with a
dtype cast at the store. The resharder's pack and unpack on GPUs.

Runs are cut into chunks of at most BLOCK elements on the host (`chunk_runs`, once per plan), so
program i copies exactly chunk i: no program idles on a short run while another walks a long one.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _copy_runs_kernel(src_ptr, dst_ptr, src_offsets_ptr, dst_offsets_ptr, lengths_ptr, BLOCK: tl.constexpr):
    chunk = tl.program_id(0)
    src = tl.load(src_offsets_ptr + chunk)
    dst = tl.load(dst_offsets_ptr + chunk)
    n = tl.load(lengths_ptr + chunk)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(src_ptr + src + offs, mask=mask)
    tl.store(dst_ptr + dst + offs, x.to(dst_ptr.dtype.element_ty), mask=mask)


def chunk_runs(runs: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """(src_offset, dst_offset, length) runs -> int64 chunk tables (src_offsets, dst_offsets, lengths)."""
    src, dst, length = torch.tensor(runs, dtype=torch.int64).reshape(-1, 3).unbind(1)
    pieces = (length + BLOCK - 1) // BLOCK
    run = torch.repeat_interleave(torch.arange(len(length)), pieces)
    start = (torch.arange(int(pieces.sum())) - (torch.cumsum(pieces, 0) - pieces)[run]) * BLOCK
    return tuple(t.to(device) for t in (src[run] + start, dst[run] + start, (length[run] - start).clamp(max=BLOCK)))


def copy_runs(src: torch.Tensor, dst: torch.Tensor, chunks: tuple[torch.Tensor, ...]) -> None:
    """src, dst: contiguous; chunks from chunk_runs, already checked to lie inside both."""
    if chunks[0].numel():
        _copy_runs_kernel[(chunks[0].numel(),)](src, dst, *chunks, BLOCK=BLOCK)
