"""Every bad input to hybrid_engine.kernels raises before any kernel runs, naming the argument.

Run under the default CPU path and forced Triton: the interpreter would read or write out of
bounds silently, so nothing here may reach it.
"""
import pytest
import torch

from hybrid_engine import kernels

NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 6, 16, 2, 64


def cache() -> torch.Tensor:
    return torch.randn(NUM_BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM)


def int32(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


# Each helper calls an op with valid arguments except the ones a case overrides.
def write_kv(**overrides):
    args = dict(key=torch.randn(3, KV_HEADS, HEAD_DIM), value=torch.randn(3, KV_HEADS, HEAD_DIM), k_cache=cache(),
                v_cache=cache(), slots=torch.tensor([0, -1, 95]))
    kernels.write_kv(**(args | overrides))


def copy_blocks(copies):
    kernels.copy_blocks(cache(), cache(), copies)


def prefill(**overrides):
    args = dict(q=torch.randn(5, 4, HEAD_DIM), k=torch.randn(5, KV_HEADS, HEAD_DIM),
                v=torch.randn(5, KV_HEADS, HEAD_DIM), cu_seqlens=int32(0, 2, 5))
    kernels.prefill_attention(**(args | overrides))


def decode(**overrides):
    args = dict(q=torch.randn(2, 4, HEAD_DIM), k_cache=cache(), v_cache=cache(),
                block_tables=int32(3, -1, 0, 5).view(2, 2), context_lens=int32(16, 20))
    kernels.decode_attention(**(args | overrides))


def linear(**overrides):
    args = dict(x=torch.randn(3, 32), weight=torch.randn(16, 32), bias=None, activation="gelu")
    kernels.linear_act(**(args | overrides))


def layer_norm(**overrides):
    args = dict(x=torch.randn(3, 32), residual=None, weight=torch.randn(32), bias=None, eps=1e-5)
    kernels.add_layer_norm(**(args | overrides))


# Each case: the call and a regular expression for the meaningful part of its message (the argument,
# what is wrong with it, and the values involved), so that a case cannot pass on another check's error.
BAD_INPUTS = {
    "slot past the cache": (lambda: write_kv(slots=torch.tensor([0, 1, 96])),
                            r"slots must be -1 \(skip\) or in \[0, 96\), got min 0 max 96"),
    "slot below -1": (lambda: write_kv(slots=torch.tensor([0, -2, 1])),
                      r"slots must be -1 \(skip\) or in \[0, 96\), got min -2 max 1"),
    "slots per token": (lambda: write_kv(slots=torch.tensor([0, 1])), "slots has 2 entries for 3 tokens of key"),
    "float slots": (lambda: write_kv(slots=torch.tensor([0.0, 1.0, 2.0])),
                    "slots must have dtype torch.int32 or torch.int64, got torch.float32"),
    "slots on another device": (lambda: write_kv(slots=torch.tensor([0, 1, 2], device="meta")),
                                "slots is on meta but key is on cpu"),
    "key heads": (lambda: write_kv(key=torch.randn(3, 1, HEAD_DIM), value=torch.randn(3, 1, HEAD_DIM)),
                  r"key \(3, 1, 64\) does not match the \[KVH, D\] of k_cache \(6, 16, 2, 64\)"),
    "key not a tensor": (lambda: write_kv(key=[[0.0]]), "key must be a tensor, got list"),
    "value dtype": (lambda: write_kv(value=torch.randn(3, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)),
                    "value has dtype torch.bfloat16 but key has torch.float32"),
    "k_cache strided": (lambda: write_kv(k_cache=cache().transpose(0, 1).contiguous().transpose(0, 1)),
                        r"k_cache must be contiguous \(it is written in place\)"),
    "v_cache shape": (lambda: write_kv(v_cache=cache()[:3]),
                      r"v_cache has shape \(3, 16, 2, 64\), incompatible with k_cache \(6, 16, 2, 64\)"),
    "k_cache rank": (lambda: write_kv(k_cache=cache()[0]), r"k_cache must have 4 dimensions, got shape \(16, 2, 64\)"),
    "copy source past the cache": (lambda: copy_blocks(torch.tensor([[6, 0]])),
                                   r"copies holds block ids outside \[0, 6\), got min 0 max 6"),
    "copy negative destination": (lambda: copy_blocks(torch.tensor([[1, -1]])),
                                  r"copies holds block ids outside \[0, 6\), got min -1 max 1"),
    "copies shape": (lambda: copy_blocks(torch.tensor([[1, 2, 3]])),
                     r"copies must be \[k, 2\] \(src_block, dst_block\), got shape \(1, 3\)"),
    "copies to one block twice": (lambda: copy_blocks(torch.tensor([[1, 2], [3, 2]])),
                                  "copies must have distinct destination blocks that are not also sources"),
    "copy chain": (lambda: copy_blocks(torch.tensor([[1, 2], [2, 3]])),
                   "copies must have distinct destination blocks that are not also sources"),
    "heads not a multiple": (lambda: prefill(q=torch.randn(5, 3, HEAD_DIM)),
                             "q has 3 heads, not a multiple of the 2 heads of the KV tensors"),
    "k tokens": (lambda: prefill(k=torch.randn(4, KV_HEADS, HEAD_DIM), v=torch.randn(4, KV_HEADS, HEAD_DIM)),
                 "k has 4 tokens but q has 5"),
    "k head_dim": (lambda: prefill(k=torch.randn(5, KV_HEADS, 32)),
                   r"k has shape \(5, 2, 32\), incompatible with q \(5, 4, 64\)"),
    "v dtype": (lambda: prefill(v=torch.randn(5, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)),
                "v has dtype torch.bfloat16 but k has torch.float32"),
    "q rank": (lambda: prefill(q=torch.randn(5, 4 * HEAD_DIM)), r"q must have 3 dimensions, got shape \(5, 256\)"),
    "cu_seqlens int64": (lambda: prefill(cu_seqlens=torch.tensor([0, 2, 5])),
                         "cu_seqlens must have dtype torch.int32, got torch.int64"),
    "cu_seqlens short of T": (lambda: prefill(cu_seqlens=int32(0, 2, 4)),
                              r"cu_seqlens must rise monotonically from 0 to T=5, got \[0, 2, 4\]"),
    "cu_seqlens not from 0": (lambda: prefill(cu_seqlens=int32(1, 2, 5)),
                              r"cu_seqlens must rise monotonically from 0 to T=5, got \[1, 2, 5\]"),
    "cu_seqlens decreasing": (lambda: prefill(cu_seqlens=int32(0, 4, 3, 5)),
                              r"cu_seqlens must rise monotonically from 0 to T=5, got \[0, 4, 3, 5\]"),
    "cu_seqlens alone": (lambda: prefill(cu_seqlens=int32(5)), r"cu_seqlens needs at least 2 entries \[0, ..., T\]"),
    "context_lens of 0": (lambda: decode(context_lens=int32(16, 0)),
                          r"context_lens must be in \[1, 32\] \(block_tables width 2 x block_size 16\), got min 0 max 16"),
    "context past the table": (lambda: decode(context_lens=int32(33, 20)),
                               r"context_lens must be in \[1, 32\] .*got min 20 max 33"),
    "context_lens int64": (lambda: decode(context_lens=torch.tensor([16, 20])),
                           "context_lens must have dtype torch.int32, got torch.int64"),
    "block id past the cache": (lambda: decode(block_tables=int32(3, -1, 0, 6).view(2, 2)),
                                r"block_tables holds block ids outside \[0, 6\) within the context \(min 0, max 6\)"),
    "padding inside the context": (lambda: decode(block_tables=int32(3, -1, 0, -1).view(2, 2)),
                                   r"block_tables holds block ids outside \[0, 6\) within the context \(min -1, max 3\)"),
    "block_tables rows": (lambda: decode(block_tables=int32(3, -1).view(1, 2)),
                          r"block_tables \(1, 2\) and context_lens \(2,\) must have one row per query, batch 2"),
    "block_tables int64": (lambda: decode(block_tables=torch.tensor([[3, -1], [0, 5]])),
                           "block_tables must have dtype torch.int32, got torch.int64"),
    "q dtype vs cache": (lambda: decode(q=torch.randn(2, 4, HEAD_DIM, dtype=torch.bfloat16)),
                         "k_cache has dtype torch.float32 but q has torch.bfloat16"),
    "decode head_dim": (lambda: decode(q=torch.randn(2, 4, 32)),
                        r"k_cache has shape \(6, 16, 2, 64\), incompatible with q \(2, 4, 32\)"),
    "unknown activation": (lambda: linear(activation="tanh"), r"activation must be one of \[.*\], got 'tanh'"),
    "weight in_features": (lambda: linear(weight=torch.randn(16, 31)),
                           r"weight has shape \(16, 31\), incompatible with x \(3, 32\)"),
    "weight rank": (lambda: linear(weight=torch.randn(16, 32, 1)),
                    r"weight must have 2 dimensions, got shape \(16, 32, 1\)"),
    "bias size": (lambda: linear(bias=torch.randn(32)), "bias has 32 entries, expected 16"),
    "bias dtype": (lambda: linear(bias=torch.randn(16, dtype=torch.bfloat16)),
                   "bias has dtype torch.bfloat16; supported here: torch.float32"),
    "integer x": (lambda: linear(x=torch.ones(3, 32, dtype=torch.int64)), "x has dtype torch.int64; supported here"),
    "scalar x": (lambda: linear(x=torch.tensor(1.0)), r"x must have a feature dimension \[..., features\], got a scalar"),
    "odd gate width": (lambda: kernels.silu_and_mul(torch.randn(3, 7)),
                       r"x must have an even last dimension \[..., 2I\], got shape \(3, 7\)"),
    "norm weight size": (lambda: layer_norm(weight=torch.randn(31)), "weight has 31 entries, expected 32"),
    "residual shape": (lambda: layer_norm(residual=torch.randn(3, 31)),
                       r"residual has shape \(3, 31\), incompatible with x \(3, 32\)"),
    "residual on another device": (lambda: layer_norm(residual=torch.randn(3, 32, device="meta")),
                                   "residual is on meta but x is on cpu"),
    "norm bias dtype": (lambda: layer_norm(bias=torch.randn(32, dtype=torch.bfloat16)),
                        "bias has dtype torch.bfloat16; supported here: torch.float32"),
    "rms weight dtype": (lambda: kernels.add_rms_norm(torch.randn(2, 8), None, torch.randn(8).double(), 1e-6),
                         "weight has dtype torch.float64; supported here: torch.float32"),
}


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case, backend):
    call, message = BAD_INPUTS[case]
    with kernels.use_backend(backend), pytest.raises((ValueError, TypeError), match=message):
        call()


def test_valid_defaults_pass():
    """The helpers' defaults are valid, so each case above fails for its own reason."""
    write_kv()
    copy_blocks(torch.tensor([[1, 2], [1, 3]]))
    prefill()
    decode()
    linear()
    layer_norm(residual=torch.randn(3, 32), bias=torch.randn(32))
