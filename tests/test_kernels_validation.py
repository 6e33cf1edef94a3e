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


BAD_INPUTS = {
    "slot past the cache": (lambda: write_kv(slots=torch.tensor([0, 1, 96])), "slots"),
    "slot below -1": (lambda: write_kv(slots=torch.tensor([0, -2, 1])), "slots"),
    "slots per token": (lambda: write_kv(slots=torch.tensor([0, 1])), "slots"),
    "float slots": (lambda: write_kv(slots=torch.tensor([0.0, 1.0, 2.0])), "slots"),
    "slots on another device": (lambda: write_kv(slots=torch.tensor([0, 1, 2], device="meta")), "slots"),
    "key heads": (lambda: write_kv(key=torch.randn(3, 1, HEAD_DIM), value=torch.randn(3, 1, HEAD_DIM)), "key"),
    "key not a tensor": (lambda: write_kv(key=[[0.0]]), "key"),
    "value dtype": (lambda: write_kv(value=torch.randn(3, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)), "value"),
    "k_cache strided": (lambda: write_kv(k_cache=cache().transpose(0, 1)), "k_cache"),
    "v_cache shape": (lambda: write_kv(v_cache=cache()[:3]), "v_cache"),
    "k_cache rank": (lambda: write_kv(k_cache=cache()[0]), "k_cache"),
    "copy source past the cache": (lambda: copy_blocks(torch.tensor([[6, 0]])), "copies"),
    "copy negative destination": (lambda: copy_blocks(torch.tensor([[1, -1]])), "copies"),
    "copies shape": (lambda: copy_blocks(torch.tensor([[1, 2, 3]])), "copies"),
    "copies to one block twice": (lambda: copy_blocks(torch.tensor([[1, 2], [3, 2]])), "copies"),
    "copy chain": (lambda: copy_blocks(torch.tensor([[1, 2], [2, 3]])), "copies"),
    "heads not a multiple": (lambda: prefill(q=torch.randn(5, 3, HEAD_DIM)), "q has 3 heads"),
    "k tokens": (lambda: prefill(k=torch.randn(4, KV_HEADS, HEAD_DIM), v=torch.randn(4, KV_HEADS, HEAD_DIM)),
                 "k has 4 tokens"),
    "k head_dim": (lambda: prefill(k=torch.randn(5, KV_HEADS, 32)), "k has shape"),
    "v dtype": (lambda: prefill(v=torch.randn(5, KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)), "v has dtype"),
    "q rank": (lambda: prefill(q=torch.randn(5, 4 * HEAD_DIM)), "q must have 3"),
    "cu_seqlens int64": (lambda: prefill(cu_seqlens=torch.tensor([0, 2, 5])), "cu_seqlens"),
    "cu_seqlens short of T": (lambda: prefill(cu_seqlens=int32(0, 2, 4)), "cu_seqlens"),
    "cu_seqlens not from 0": (lambda: prefill(cu_seqlens=int32(1, 2, 5)), "cu_seqlens"),
    "cu_seqlens decreasing": (lambda: prefill(cu_seqlens=int32(0, 4, 3, 5)), "cu_seqlens"),
    "cu_seqlens alone": (lambda: prefill(cu_seqlens=int32(5)), "cu_seqlens"),
    "context_lens of 0": (lambda: decode(context_lens=int32(16, 0)), "context_lens"),
    "context past the table": (lambda: decode(context_lens=int32(33, 20)), "context_lens"),
    "context_lens int64": (lambda: decode(context_lens=torch.tensor([16, 20])), "context_lens"),
    "block id past the cache": (lambda: decode(block_tables=int32(3, -1, 0, 6).view(2, 2)), "block_tables"),
    "padding inside the context": (lambda: decode(block_tables=int32(3, -1, 0, -1).view(2, 2)), "block_tables"),
    "block_tables rows": (lambda: decode(block_tables=int32(3, -1).view(1, 2)), "block_tables"),
    "block_tables int64": (lambda: decode(block_tables=torch.tensor([[3, -1], [0, 5]])), "block_tables"),
    "q dtype vs cache": (lambda: decode(q=torch.randn(2, 4, HEAD_DIM, dtype=torch.bfloat16)), "k_cache has dtype"),
    "decode head_dim": (lambda: decode(q=torch.randn(2, 4, 32)), "k_cache has shape"),
    "unknown activation": (lambda: linear(activation="tanh"), "activation"),
    "weight in_features": (lambda: linear(weight=torch.randn(16, 31)), "weight"),
    "weight rank": (lambda: linear(weight=torch.randn(16, 32, 1)), "weight"),
    "bias size": (lambda: linear(bias=torch.randn(32)), "bias"),
    "bias dtype": (lambda: linear(bias=torch.randn(16, dtype=torch.bfloat16)), "bias"),
    "integer x": (lambda: linear(x=torch.ones(3, 32, dtype=torch.int64)), "x"),
    "scalar x": (lambda: linear(x=torch.tensor(1.0)), "x must have a feature"),
    "odd gate width": (lambda: kernels.silu_and_mul(torch.randn(3, 7)), "x"),
    "norm weight size": (lambda: layer_norm(weight=torch.randn(31)), "weight"),
    "residual shape": (lambda: layer_norm(residual=torch.randn(3, 31)), "residual"),
    "residual on another device": (lambda: layer_norm(residual=torch.randn(3, 32, device="meta")), "residual"),
    "norm bias dtype": (lambda: layer_norm(bias=torch.randn(32, dtype=torch.bfloat16)), "bias"),
    "rms weight dtype": (lambda: kernels.add_rms_norm(torch.randn(2, 8), None, torch.randn(8).double(), 1e-6),
                         "weight"),
}


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_naming_the_argument(case, backend):
    call, name = BAD_INPUTS[case]
    with kernels.use_backend(backend), pytest.raises((ValueError, TypeError), match=name):
        call()


def test_valid_defaults_pass():
    """The helpers' defaults are valid, so each case above fails for its own reason."""
    write_kv()
    copy_blocks(torch.tensor([[1, 2], [1, 3]]))
    prefill()
    decode()
    linear()
    layer_norm(residual=torch.randn(3, 32), bias=torch.randn(32))
