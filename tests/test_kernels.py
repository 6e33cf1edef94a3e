"""hybrid_engine.kernels against the float32 reference, on every path this machine can run:
Triton through the interpreter (float32, float16; TRITON_INTERPRET=1 from conftest.py) and the
CPU default path (float32, bfloat16: C++ attention when built, native torch otherwise).

Interpreter tests are expensive per program, so shapes are listed case by case (each case covers
some head_dim / GQA ratio / block size / ragged-length corner) instead of a cross product.
"""
import subprocess
import sys

import pytest
import torch

from hybrid_engine import kernels
from hybrid_engine.kernels import reference

pytestmark = pytest.mark.any_device

PATHS = [("triton", torch.float32), ("triton", torch.float16), ("auto", torch.float32), ("auto", torch.bfloat16)]
PATH_IDS = ["triton-fp32", "triton-fp16", "cpu-fp32", "cpu-bf16"]
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).to(dtype)


def paged_tables(context_lens: list[int], block_size: int, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block tables over shuffled blocks, padded with -1 one column beyond the longest sequence."""
    needed = [-(-n // block_size) for n in context_lens]
    free = torch.randperm(num_blocks).tolist()
    tables = torch.full((len(context_lens), max(needed) + 1), -1, dtype=torch.int32)
    for row, count in enumerate(needed):
        tables[row, :count] = torch.tensor([free.pop() for _ in range(count)], dtype=torch.int32)
    return tables, torch.tensor(context_lens, dtype=torch.int32)


def kv_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return (randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype),
            randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype))


def _run_on(request):
    backend, dtype = request.param
    torch.manual_seed(0)
    with kernels.use_backend(backend):
        yield dtype


path = pytest.fixture(params=PATHS, ids=PATH_IDS)(_run_on)
# The interpreter cannot multiply bf16 matrices, but element-wise bf16 kernels run there.
elementwise_path = pytest.fixture(params=[*PATHS, ("triton", torch.bfloat16)],
                                  ids=[*PATH_IDS, "triton-bf16"])(_run_on)


HEAD_DIMS, GQA_RATIOS = (64, 80, 128), (1, 2, 4, 8)


def heads(group: int) -> tuple[int, int]:
    """(num_heads, num_kv_heads) for a GQA ratio, at most 8 heads to keep the interpreter quick."""
    kv_heads = 2 if group <= 4 else 1
    return group * kv_heads, kv_heads


# Decode splits the context into partitions of 64 tokens under the interpreter: 130 exercises the
# split reduction, 2 * block_size ends exactly on a block boundary, 1 is a lone token.
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", GQA_RATIOS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_attention(path, head_dim, group, block_size):
    check_decode_attention(path, head_dim, *heads(group), block_size, [2 * block_size, 1, 130])


@pytest.mark.parametrize("context_len", [1, 32, 200])
def test_decode_attention_batch_of_one(path, context_len):
    check_decode_attention(path, 64, 4, 4, 16, [context_len])


def check_decode_attention(dtype, head_dim, num_heads, kv_heads, block_size, context_lens):
    k_cache, v_cache = kv_cache(24, block_size, kv_heads, head_dim, dtype)
    block_tables, lens = paged_tables(context_lens, block_size, 24)
    q = randn(len(context_lens), num_heads, head_dim, dtype=dtype)
    expected = reference.decode_attention(q, k_cache, v_cache, block_tables, lens, scale=0.1)
    assert_matches(kernels.decode_attention(q, k_cache, v_cache, block_tables, lens, scale=0.1), expected)


# Prefill tiles are 64 x 64 under the interpreter: 64 ends on a tile, 100 spans two.
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", GQA_RATIOS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_prefill_attention(path, head_dim, group, causal):
    check_prefill_attention(path, head_dim, *heads(group), [1, 64, 37] if causal else [100, 5], causal)


def test_prefill_attention_batch_of_one(path):
    check_prefill_attention(path, 80, 4, 2, [129], True)


def check_prefill_attention(dtype, head_dim, num_heads, kv_heads, seqlens, causal):
    tokens = sum(seqlens)
    q = randn(tokens, num_heads, head_dim, dtype=dtype)
    k, v = randn(tokens, kv_heads, head_dim, dtype=dtype), randn(tokens, kv_heads, head_dim, dtype=dtype)
    cu_seqlens = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    expected = reference.prefill_attention(q, k, v, cu_seqlens, causal=causal)
    assert_matches(kernels.prefill_attention(q, k, v, cu_seqlens, causal=causal), expected)


def test_prefill_attention_strided_inputs(path):
    """q, k, v as views of one fused projection, the way models produce them."""
    qkv = randn(40, 3, 2, 64, dtype=path)
    q, k, v = qkv.unbind(1)
    cu_seqlens = torch.tensor([0, 7, 40], dtype=torch.int32)
    expected = reference.prefill_attention(q, k, v, cu_seqlens)
    assert_matches(kernels.prefill_attention(q, k, v, cu_seqlens), expected)


def test_decode_attention_strided_query(path):
    k_cache, v_cache = kv_cache(8, 16, 2, 64, path)
    block_tables, lens = paged_tables([40, 7], 16, 8)
    q = randn(2, 3, 4, 64, dtype=path)[:, 1]  # the q of a fused [B, 3, H, D] projection
    expected = reference.decode_attention(q, k_cache, v_cache, block_tables, lens)
    assert_matches(kernels.decode_attention(q, k_cache, v_cache, block_tables, lens), expected)


def test_row_views(path):
    """Column slices (row stride > width) and a transposed weight, for the row-wise ops."""
    wide = randn(4, 200, dtype=path)
    x, residual = wide[:, :64], wide[:, 100:164]
    weight = randn(64, 48, dtype=path, scale=0.125).t()
    assert_matches(kernels.linear_act(x, weight, None, "silu"), reference.linear_act(x, weight, None, "silu"))
    assert_matches(kernels.silu_and_mul(wide[:, :96]), reference.silu_and_mul(wide[:, :96]))
    norm_weight = randn(64, dtype=path)
    for actual, expected in zip(kernels.add_rms_norm(x, residual, norm_weight, 1e-6),
                                reference.add_rms_norm(x, residual, norm_weight, 1e-6)):
        assert_matches(actual, expected)


@pytest.mark.parametrize("block_size,kv_heads,head_dim", [(16, 2, 64), (32, 1, 80), (16, 4, 128)])
def test_write_kv(elementwise_path, block_size, kv_heads, head_dim):
    dtype = elementwise_path
    k_cache, v_cache = kv_cache(6, block_size, kv_heads, head_dim, dtype)
    num_slots = 6 * block_size
    slots = torch.randperm(num_slots)[:9]
    slots[[2, 5]] = -1
    slots[0] = num_slots - 1  # the last slot of the last block
    key, value = randn(9, 2, kv_heads, head_dim, dtype=dtype).unbind(1)  # views of a fused projection
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(key, value, expected_k, expected_v, slots)
    kernels.write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def test_copy_blocks(elementwise_path):
    dtype = elementwise_path
    k_cache, v_cache = kv_cache(8, 16, 2, 64, dtype)
    copies = torch.tensor([[3, 0], [3, 5], [7, 1]])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.copy_blocks(expected_k, expected_v, copies)
    kernels.copy_blocks(k_cache, v_cache, copies)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("activation", sorted(reference.ACTIVATIONS))
@pytest.mark.parametrize("shape,out_features,bias", [((1, 96), 70, True), ((2, 5, 80), 128, False)])
def test_linear_act(path, activation, shape, out_features, bias):
    x = randn(*shape, dtype=path)
    weight = randn(out_features, shape[-1], dtype=path, scale=shape[-1] ** -0.5)
    b = randn(out_features, dtype=path) if bias else None
    assert_matches(kernels.linear_act(x, weight, b, activation), reference.linear_act(x, weight, b, activation))


@pytest.mark.parametrize("shape", [(1, 2 * 64), (3, 5, 2 * 88)])
def test_silu_and_mul(elementwise_path, shape):
    dtype = elementwise_path
    x = randn(*shape, dtype=dtype, scale=2.0)
    assert_matches(kernels.silu_and_mul(x), reference.silu_and_mul(x))


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape,with_residual,with_bias", [((1, 64), True, True), ((3, 2, 200), False, True),
                                                             ((5, 96), True, False)])
def test_add_norm(elementwise_path, rms, shape, with_residual, with_bias):
    dtype = elementwise_path
    x = randn(*shape, dtype=dtype, scale=3.0)
    residual = randn(*shape, dtype=dtype) if with_residual else None
    weight, bias = randn(shape[-1], dtype=dtype), randn(shape[-1], dtype=dtype) if with_bias else None
    if rms:
        out, new_residual = kernels.add_rms_norm(x, residual, weight, 1e-5)
        expected, expected_residual = reference.add_rms_norm(x, residual, weight, 1e-5)
    else:
        out, new_residual = kernels.add_layer_norm(x, residual, weight, bias, 1e-5)
        expected, expected_residual = reference.add_layer_norm(x, residual, weight, bias, 1e-5)
    assert_matches(out, expected)
    # Not torch.equal: the interpreter casts float32 to bf16 by truncation, not round-to-nearest.
    assert_matches(new_residual, expected_residual)
    if residual is None:
        assert new_residual is x


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.cpu_only
@pytest.mark.parametrize("op", ["decode_attention", "prefill_attention"])
def test_cpp_backend_matches_reference(op):
    if not hasattr(torch.ops.hybrid_engine, op):
        pytest.skip(f"hybrid_engine._C has no {op} yet")
    torch.manual_seed(1)
    with kernels.use_backend("cpp"):
        if op == "decode_attention":
            check_decode_attention(torch.bfloat16, 128, 8, 1, 16, [200, 16, 1])
        else:
            check_prefill_attention(torch.bfloat16, 80, 4, 1, [17, 1, 128], True)


def test_auto_backend_on_cpu():
    expected = "cpp" if hasattr(torch.ops.hybrid_engine, "decode_attention") else "torch"
    assert kernels._backend("decode_attention", torch.device("cpu")) == expected
    assert kernels._backend("linear_act", torch.device("cpu")) == "torch"
    assert kernels._backend("linear_act", torch.device("cuda")) == "triton"


def test_use_backend_is_scoped_and_checked():
    with kernels.use_backend("reference"):
        assert kernels._backend("silu_and_mul", torch.device("cpu")) == "reference"
    assert kernels._backend("silu_and_mul", torch.device("cpu")) == "torch"
    assert kernels._backend("add_rms_norm", torch.device("cpu")) == "torch"
    assert kernels._backend("decode_attention", torch.device("cpu")) == "cpp"
    with kernels.use_backend("cpp"):
        assert kernels._backend("add_rms_norm", torch.device("cpu")) == "cpp"
    with pytest.raises(ValueError, match="backend"):
        with kernels.use_backend("cuda"):
            pass
    with kernels.use_backend("cpp"), pytest.raises(RuntimeError, match="linear_act"):
        kernels.linear_act(torch.randn(2, 4), torch.randn(3, 4), None, "none")


@pytest.mark.cpu_only
def test_import_does_not_import_triton():
    code = "import sys, hybrid_engine, hybrid_engine.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.cpu_only
def test_float16_rejected_on_cpu():
    with pytest.raises(ValueError, match="x has dtype torch.float16"):
        kernels.silu_and_mul(torch.randn(2, 8, dtype=torch.float16))


@pytest.mark.cpu_only
def test_bfloat16_matmul_rejected_by_interpreter():
    with kernels.use_backend("triton"), pytest.raises(ValueError, match="bfloat16"):
        kernels.linear_act(torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(16, 16, dtype=torch.bfloat16),
                           None, "none")


@pytest.mark.cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_forced_cpp_norms_and_silu_match_reference(dtype, with_residual):
    torch.manual_seed(5)
    x, residual = torch.randn(7, 96).to(dtype), torch.randn(7, 96).to(dtype) if with_residual else None
    weight, bias, gate_up = torch.randn(96).to(dtype), torch.randn(96).to(dtype), torch.randn(5, 2 * 48).to(dtype)
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    with kernels.use_backend("cpp"):
        layer = kernels.add_layer_norm(x, residual, weight, bias, 1e-5)
        rms = kernels.add_rms_norm(x, residual, weight, 1e-6)
        silu = kernels.silu_and_mul(gate_up)
    for got, want in ((layer, reference.add_layer_norm(x, residual, weight, bias, 1e-5)),
                      (rms, reference.add_rms_norm(x, residual, weight, 1e-6))):
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], **tol)
    if not with_residual:
        assert layer[1] is x and rms[1] is x
    torch.testing.assert_close(silu, reference.silu_and_mul(gate_up), **tol)
