"""Sliding-window attention (Mistral, Qwen sliding layers) in the prefill and decode kernels: the
reference against masked SDPA, and the C++ and Triton (interpreter) kernels against the reference
on ragged batches with windows smaller than the sequences, a single token, and tile-crossing."""
import pytest
import torch
import torch.nn.functional as F
from test_kernels import assert_matches, kv_cache, paged_tables, path, randn  # noqa: F401 (path is a fixture)

from hybrid_engine import kernels
from hybrid_engine.kernels import reference

pytestmark = pytest.mark.any_device

# Interpreter tiles are 64 keys (prefill) and 64-token splits (decode): window 7 leaves whole
# tiles and splits behind it and rows whose first tile is all hidden; 65 crosses a tile edge.
WINDOWS = [1, 7, 65]
SEQLENS = [100, 1, 37, 130]


def sdpa_with_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """One sequence, q/k/v [T, heads, D] (k/v already expanded to q's heads), float32."""
    position = torch.arange(q.shape[0])
    behind = position[:, None] - position[None, :]
    visible = (behind >= 0) & (behind < window)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=visible)
    return out.transpose(0, 1)


@pytest.mark.parametrize("window", WINDOWS)
def test_reference_window_equals_masked_sdpa(window):
    torch.manual_seed(window)
    q, k, v = (torch.randn(90, 4, 16) for _ in range(3))
    cu_seqlens = torch.tensor([0, 90], dtype=torch.int32)
    expected = sdpa_with_window(q, k, v, window)
    torch.testing.assert_close(reference.prefill_attention(q, k, v, cu_seqlens, window=window), expected)
    # Decode: the last token against the paged cache sees what its prefill row saw.
    k_cache, v_cache = k.view(9, 10, 4, 16), v.view(9, 10, 4, 16)
    tables, lens = torch.arange(9, dtype=torch.int32)[None], torch.tensor([90], dtype=torch.int32)
    out = reference.decode_attention(q[-1:], k_cache, v_cache, tables, lens, window=window)
    torch.testing.assert_close(out, expected[-1:])


@pytest.mark.parametrize("window", WINDOWS)
def test_prefill_attention_window(path, window):  # noqa: F811
    dtype = path
    tokens = sum(SEQLENS)
    q = randn(tokens, 4, 64, dtype=dtype)
    k, v = randn(tokens, 2, 64, dtype=dtype), randn(tokens, 2, 64, dtype=dtype)
    cu_seqlens = torch.tensor([0, *torch.tensor(SEQLENS).cumsum(0).tolist()], dtype=torch.int32)
    expected = reference.prefill_attention(q, k, v, cu_seqlens, window=window)
    assert_matches(kernels.prefill_attention(q, k, v, cu_seqlens, window=window), expected)


@pytest.mark.parametrize("window", WINDOWS)
def test_decode_attention_window(path, window):  # noqa: F811
    dtype = path
    k_cache, v_cache = kv_cache(40, 16, 2, 64, dtype)
    block_tables, lens = paged_tables(SEQLENS, 16, 40)
    q = randn(len(SEQLENS), 6, 64, dtype=dtype)
    expected = reference.decode_attention(q, k_cache, v_cache, block_tables, lens, window=window)
    assert_matches(kernels.decode_attention(q, k_cache, v_cache, block_tables, lens, window=window), expected)


@pytest.mark.parametrize("window, causal, message", [(0, True, "window must be None or an int >= 1"),
                                                     (2.5, True, "window must be None or an int >= 1"),
                                                     (4, False, "window .* needs causal=True")])
def test_bad_window_raises(window, causal, message):
    q = torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match=message):
        kernels.prefill_attention(q, q, q, torch.tensor([0, 5], dtype=torch.int32), causal=causal, window=window)
