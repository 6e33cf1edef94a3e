"""Scatter new keys and values into the paged KV cache.

For every token t with slot s_t >= 0 (slot -1 marks padding and is skipped):

    k_cache.view(-1, KVH, D)[s_t] = key[t]        v_cache.view(-1, KVH, D)[s_t] = value[t]

A slot is block * block_size + offset, so the [KVH, D] row of a slot is contiguous in a
contiguous cache: one program copies one token's KVH * D values, cast to the cache dtype.
"""
import torch
import triton
import triton.language as tl

from hybrid_engine.kernels.triton import packed_rows


@triton.jit
def _write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, key_stride, value_stride,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot < 0:
        return
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < ROW
    key = tl.load(key_ptr + token.to(tl.int64) * key_stride + cols, mask=mask)
    value = tl.load(value_ptr + token.to(tl.int64) * value_stride + cols, mask=mask)
    tl.store(k_cache_ptr + slot * ROW + cols, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * ROW + cols, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """key/value [T, KVH, D]; contiguous caches; validated slots."""
    key, value, slots = packed_rows(key), packed_rows(value), slots.contiguous()
    row = key.shape[1] * key.shape[2]
    block = min(triton.next_power_of_2(row), 1024)
    grid = (key.shape[0], triton.cdiv(row, block))
    _write_kv_kernel[grid](key, value, k_cache, v_cache, slots, key.stride(0), value.stride(0), ROW=row, BLOCK=block)
