"""The C++ CPU kernels (torch.ops.hybrid_engine.*) called directly, against the plain-torch
reference (hybrid_engine.kernels.reference), plus their own argument checks: the ops must be safe
without the Python layer's validation in front of them. Attention first, then the fused
elementwise ops (add_norm, silu_and_mul).

Each case draws fresh random inputs (never zeros); shapes cover head_dim 64/80/128 and odd ones,
GQA ratios 1/2/4/8, block sizes 16/32 and ones that are not a multiple of 16, ragged lengths
including 1 and lengths ending exactly on a block boundary, shuffled block tables and batch 1.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import hybrid_engine  # noqa: F401  (loads hybrid_engine._C, which registers the ops)
from hybrid_engine.kernels import reference

ops = torch.ops.hybrid_engine
DTYPES = [torch.float32, torch.bfloat16]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
HEAD_DIMS, GQA_RATIOS = (64, 80, 128), (1, 2, 4, 8)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float | None = None) -> None:
    tol = TOLERANCE[expected.dtype] if tol is None else tol
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol)


def randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def heads(group: int) -> tuple[int, int]:
    """(num_heads, num_kv_heads) for a GQA ratio."""
    kv_heads = 3 if group <= 2 else 2
    return group * kv_heads, kv_heads


def paged_inputs(context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k_cache, v_cache, block_tables (over shuffled blocks, -1 padded), context_lens; the cache
    has spare blocks so that unused ones are never all that is read."""
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + 3
    blocks = torch.randperm(num_blocks).int()
    block_tables = torch.full((len(context_lens), max(needed) + 2), -1, dtype=torch.int32)
    start = 0
    for row, count in enumerate(needed):
        block_tables[row, :count] = blocks[start:start + count]
        start += count
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (randn(len(context_lens), num_heads, head_dim, dtype=dtype), randn(*cache_shape, dtype=dtype),
            randn(*cache_shape, dtype=dtype), block_tables, torch.tensor(context_lens, dtype=torch.int32))


def check_decode(context_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, scale: float | None = None, tol: float | None = None) -> None:
    q, k_cache, v_cache, block_tables, lens = paged_inputs(context_lens, num_heads, num_kv_heads, head_dim,
                                                           block_size, dtype)
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    out = ops.decode_attention(q, k_cache, v_cache, block_tables, lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_matches(out, reference.decode_attention(q, k_cache, v_cache, block_tables, lens, scale=scale), tol)


@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("group", GQA_RATIOS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention(dtype, head_dim, group, block_size):
    torch.manual_seed(head_dim * 100 + group * 10 + block_size)
    lens = [1, block_size, 3 * block_size, block_size + 1, 77]  # lone token, block boundaries, ragged
    check_decode(lens, *heads(group), head_dim, block_size, dtype)


@pytest.mark.parametrize("context_len", [1, 16, 300])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_batch_of_one(dtype, context_len):
    torch.manual_seed(context_len)
    check_decode([context_len], 32, 32, 64, 16, dtype)


# Head sizes with 16- and 8-element tails (AVX-512, AVX2) and a scalar tail, and block sizes that are
# not a multiple of the 16 (AVX2: 8) tokens the kernel scores at once.
@pytest.mark.parametrize("head_dim,block_size", [(8, 16), (36, 7), (40, 8), (72, 24), (96, 5), (256, 48)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention_odd_sizes(dtype, head_dim, block_size):
    torch.manual_seed(head_dim + block_size)
    check_decode([1, block_size, 2 * block_size + 3, 50], 4, 2, head_dim, block_size, dtype)


# Scores in the hundreds: a softmax without the running max would overflow exp. Rounding errors of
# the scores (both sides fp32) are amplified 30x in the weights, hence the looser tolerance.
def test_decode_attention_large_scores_stay_finite():
    torch.manual_seed(0)
    check_decode([5, 40, 129], 4, 2, 64, 16, torch.float32, scale=30.0, tol=1e-3)


def test_decode_attention_reads_only_its_blocks():
    """A NaN in a block the sequence does not own must not reach its output."""
    torch.manual_seed(0)
    q, k_cache, v_cache, block_tables, lens = paged_inputs([20, 33], 4, 2, 64, 16, torch.float32)
    used = set(block_tables[block_tables >= 0].tolist())
    unused = [b for b in range(k_cache.shape[0]) if b not in used]
    k_cache[unused], v_cache[unused] = float("nan"), float("nan")
    k_cache[block_tables[0, 1], 4:], v_cache[block_tables[0, 1], 4:] = float("nan"), float("nan")  # past token 20
    out = ops.decode_attention(q, k_cache, v_cache, block_tables, lens, 0.125)
    assert torch.isfinite(out).all()
    assert_matches(out, reference.decode_attention(q, k_cache, v_cache, block_tables, lens, scale=0.125))


def check_prefill(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  causal: bool, scale: float | None = None, tol: float | None = None) -> None:
    total = sum(seq_lens)
    q = randn(total, num_heads, head_dim, dtype=dtype)
    k, v = randn(total, num_kv_heads, head_dim, dtype=dtype), randn(total, num_kv_heads, head_dim, dtype=dtype)
    cu_seqlens = torch.tensor([0, *seq_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    scale = 1 / math.sqrt(head_dim) if scale is None else scale
    out = ops.prefill_attention(q, k, v, cu_seqlens, causal, scale)
    assert out.dtype == dtype and out.shape == q.shape
    assert_matches(out, reference.prefill_attention(q, k, v, cu_seqlens, causal=causal, scale=scale), tol)


# 1-token sequences, one shorter than a key tile (64) and ones spanning several query tiles.
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("group", GQA_RATIOS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention(dtype, head_dim, group, causal):
    torch.manual_seed(head_dim * 10 + group)
    check_prefill([1, 70, 3, 130, 1], *heads(group), head_dim, dtype, causal)


@pytest.mark.parametrize("seq_lens", [[1], [200], [64, 0, 65]], ids=["one-token", "single", "with-empty"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_batches(dtype, seq_lens):
    torch.manual_seed(len(seq_lens))
    check_prefill(seq_lens, 8, 2, 64, dtype, causal=True)


@pytest.mark.parametrize("head_dim", [8, 40, 72])
def test_prefill_attention_odd_head_dims(head_dim):
    torch.manual_seed(head_dim)
    check_prefill([17, 90], 6, 3, head_dim, torch.float32, causal=True)


# Views of one fused projection [T, (H + 2 KVH) D] are read in place (the token stride is the whole
# projection row); any other layout (heads not adjacent) is copied first. Both must give the same
# result as contiguous inputs.
@pytest.mark.parametrize("layout", ["fused", "heads-strided"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_attention_strided_inputs(dtype, layout):
    torch.manual_seed(1)
    seq_lens, heads, kv_heads, head_dim = [37, 70], 8, 2, 64
    cu_seqlens = torch.tensor([0, *seq_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    if layout == "fused":
        qkv = randn(sum(seq_lens), (heads + 2 * kv_heads) * head_dim, dtype=dtype)
        q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, head_dim)) for t in (q, k, v))
    else:
        q, k, v = (randn(n, sum(seq_lens), head_dim, dtype=dtype).transpose(0, 1) for n in (heads, kv_heads, kv_heads))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out = ops.prefill_attention(q, k, v, cu_seqlens, True, 0.125)
    assert out.is_contiguous()
    expected = reference.prefill_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, scale=0.125)
    assert_matches(out, expected)


def test_prefill_attention_large_scores_stay_finite():
    torch.manual_seed(0)
    check_prefill([100, 7], 4, 2, 64, torch.float32, causal=True, scale=30.0, tol=1e-3)


def check_add_norm(shape: tuple, dtype: torch.dtype, rms: bool, with_residual: bool, with_bias: bool,
                   param_dtype: torch.dtype) -> None:
    x = randn(*shape, dtype=dtype)
    residual = randn(*shape, dtype=dtype) if with_residual else None
    weight = randn(shape[-1], dtype=param_dtype)
    bias = randn(shape[-1], dtype=param_dtype) if with_bias else None
    out, new_residual = ops.add_norm(x, residual, weight, bias, 1e-5, rms)
    if rms:
        expected, expected_residual = reference.add_rms_norm(x, residual, weight, 1e-5)
    else:
        expected, expected_residual = reference.add_layer_norm(x, residual, weight, bias, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert_matches(out, expected)
    if with_residual:  # the same fp32 sum rounded the same way: bit-identical
        assert torch.equal(new_residual, expected_residual)
    else:
        assert new_residual.numel() == 0


@pytest.mark.parametrize("shape", [(1, 8), (5, 77), (2, 3, 2048)], ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype, with_residual, shape):
    torch.manual_seed(shape[-1])
    check_add_norm(shape, dtype, True, with_residual, False, dtype)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(1, 8), (5, 77), (2, 3, 2048)], ids=str)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm(dtype, with_residual, shape, with_bias):
    torch.manual_seed(shape[-1])
    check_add_norm(shape, dtype, False, with_residual, with_bias, dtype)


def test_add_norm_float32_params_with_bf16_activations():
    torch.manual_seed(0)
    check_add_norm((4, 96), torch.bfloat16, False, True, True, torch.float32)


def test_add_layer_norm_large_offset():
    """A row mean far from zero: a one-pass E[h^2] - mean^2 variance would be off by percents."""
    torch.manual_seed(0)
    x, weight = torch.randn(3, 512) + 1000.0, torch.randn(512)
    out, _ = ops.add_norm(x, None, weight, None, 1e-5, False)
    assert_matches(out, reference.add_layer_norm(x, None, weight, None, 1e-5)[0], tol=1e-3)


def check_silu_and_mul(shape: tuple, dtype: torch.dtype, scale: float = 1.0) -> None:
    x = (torch.randn(*shape) * scale).to(dtype)
    out = ops.silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    assert_matches(out, reference.silu_and_mul(x), tol=TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("shape", [(1, 2), (3, 46), (2, 5, 2 * 5504)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype, shape):
    torch.manual_seed(shape[-1])
    check_silu_and_mul(shape, dtype)


def test_silu_and_mul_saturates():
    """Gates of +-100 (exp overflows/underflows): silu -> 0 and -> identity, never NaN."""
    torch.manual_seed(0)
    check_silu_and_mul((4, 64), torch.float32, scale=100.0)


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv(dtype, index_dtype):
    """Rows of a fused projection's views (token stride 3x the row) land at their slots, -1 skipped."""
    k_cache, v_cache = randn(5, 16, 3, 80, dtype=dtype), randn(5, 16, 3, 80, dtype=dtype)
    slots = torch.randperm(5 * 16)[:11]
    slots[[1, 7]] = -1
    slots[0] = 5 * 16 - 1
    key, value, _ = randn(11, 3, 3, 80, dtype=dtype).unbind(1)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(key, value, expected_k, expected_v, slots)
    ops.write_kv(key, value, k_cache, v_cache, slots.to(index_dtype))
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("slot,message", [(80, r"slots\[2\] = 80 must be -1 \(skip\) or in \[0, 80\)"),
                                          (-2, r"slots\[2\] = -2 must be -1")], ids=["past", "below"])
def test_write_kv_rejects_bad_slots_before_writing(slot, message):
    k_cache, v_cache = randn(5, 16, 2, 64, dtype=torch.float32), randn(5, 16, 2, 64, dtype=torch.float32)
    before = k_cache.clone()
    with pytest.raises(ValueError, match=message):
        ops.write_kv(randn(3, 2, 64, dtype=torch.float32), randn(3, 2, 64, dtype=torch.float32), k_cache, v_cache,
                     torch.tensor([0, 1, slot]))
    assert torch.equal(k_cache, before)


def check_linear(rows: int, out_features: int, in_features: int, dtype: torch.dtype, bias: bool, relu: bool) -> None:
    """packed_linear against F.linear in fp32 (the output rounded to dtype); where this CPU has no
    kernel for dtype, the op must refuse and say so."""
    x, weight = randn(rows, in_features, dtype=dtype), randn(out_features, in_features, dtype=dtype)
    b = randn(out_features, dtype=dtype) if bias else None
    packed = ops.pack_linear_weight(weight)
    if not hybrid_engine._C.packed_linear_supported(dtype == torch.bfloat16):
        with pytest.raises(RuntimeError, match="this CPU has no kernel for"):
            ops.packed_linear(x, packed, out_features, b, relu)
        return
    out = ops.packed_linear(x, packed, out_features, b, relu)
    expected = reference.linear_act(x, weight, b, "relu" if relu else "none")
    assert out.shape == (rows, out_features) and out.dtype == dtype
    scale = expected.float().abs().max().item() or 1.0  # sums of in_features products: error grows with them
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
# Rows around the kernels' block sizes (6 rows take 4 panels per step, 16 one); 1 to 10 panels of 16
# columns, so that a thread's last step holds 1, 2 or 3 panels.
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 12, 13, 16, 17, 40])
@pytest.mark.parametrize("out_features,in_features", [(16, 64), (37, 33), (24, 50), (100, 300), (150, 40), (1, 7)])
def test_packed_linear(dtype, rows, out_features, in_features):
    check_linear(rows, out_features, in_features, dtype, bias=rows % 2 == 1, relu=out_features != 16)


def test_packed_linear_relu_keeps_nan():
    if not hybrid_engine._C.packed_linear_supported(False):
        pytest.skip("no packed_linear kernel for float32 on this CPU")
    x, weight = torch.randn(3, 20), torch.randn(18, 20)
    x[1, 4] = float("nan")
    out = ops.packed_linear(x, ops.pack_linear_weight(weight), 18, None, True)
    assert out[1].isnan().all() and not out[[0, 2]].isnan().any() and (out[[0, 2]] >= 0).all()


def anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return int(next(line for line in f if line.startswith("AnonHugePages")).split()[1])


def test_packed_weights_ask_for_huge_pages():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[")[1].split("]")[0]
    except OSError:
        pytest.skip("no transparent huge pages here")
    if mode != "madvise":  # "always" backs them with or without asking, "never" refuses
        pytest.skip(f"transparent huge pages are {mode!r} here: only 'madvise' depends on our advice")
    weight = torch.randn(4096, 4096)  # 64 MiB: malloc maps it afresh, above its largest mmap threshold
    before = anon_huge_kib()
    packed = ops.pack_linear_weight(weight)
    assert anon_huge_kib() - before >= 60 * 1024, "the packed weight got (almost) no huge pages"
    if hybrid_engine._C.packed_linear_supported(False):
        x = torch.randn(3, 4096)
        torch.testing.assert_close(ops.packed_linear(x, packed, 4096, None, False), x @ weight.T, rtol=1e-4, atol=1e-3)


def best_isa_of_this_cpu() -> str:
    """The variant the extension should pick here, from the kernel's own view of the CPU flags."""
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "baseline"


def test_best_instruction_set_is_the_one_that_runs():
    if "HYBRID_ENGINE_CPU_ISA" in os.environ:
        pytest.skip("HYBRID_ENGINE_CPU_ISA is set for this process")
    check_silu_and_mul((3, 2 * 77), torch.float32)
    assert hybrid_engine._C.cpu_isa_variants_run() == [best_isa_of_this_cpu()]


# Every instruction-set variant: this machine runs AVX-512, so the AVX2 and baseline builds of the
# same kernels are forced through HYBRID_ENGINE_CPU_ISA in a child process (read once per process),
# which reports the variants that ran: the one asked for, and no other.
ISA_CHECK = """
import torch
import hybrid_engine
import test_cpu_kernels as t
for dtype in t.DTYPES:
    t.check_decode([1, 16, 45], 8, 2, 80, 16, dtype)
    t.check_decode([33], 4, 4, 64, 32, dtype)
    t.check_decode([7, 20], 2, 1, 48, 16, dtype)  # a 32-element chunk alone, then a tail of 16
    t.check_prefill([1, 70, 9], 8, 2, 80, dtype, causal=True)
    t.check_prefill([20], 4, 4, 72, dtype, causal=False)
    t.check_add_norm((3, 77), dtype, True, True, False, dtype)
    t.check_add_norm((3, 2048), dtype, False, True, True, dtype)
    t.check_silu_and_mul((3, 2 * 77), dtype)
    t.check_linear(9, 37, 45, dtype, True, True)
    t.check_linear(16, 48, 130, dtype, False, False)
    t.check_linear(16, 40, 30, dtype, True, False)  # 5 panels of 8 columns: a last step of 1 in the 6-row kernel
    t.check_linear(40, 40, 30, dtype, False, True)
print(",".join(hybrid_engine._C.cpu_isa_variants_run()))
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_other_instruction_sets(isa):
    env = {**os.environ, "HYBRID_ENGINE_CPU_ISA": isa, "PYTHONPATH": os.path.dirname(__file__)}
    result = subprocess.run([sys.executable, "-c", ISA_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == isa, f"asked for {isa}, ran {result.stdout.split()[-1]}"


# Bad arguments raise RuntimeError naming the argument; none may reach the kernel.
def decode_args(**changes) -> list:
    q, k_cache, v_cache, block_tables, lens = paged_inputs([5, 20], 4, 2, 64, 16, torch.float32)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=lens, scale=0.125)
    for name, change in changes.items():
        args[name] = change(args)
    return list(args.values())


def set_entry(name: str, index: tuple, value: int):
    def change(args):
        t = args[name].clone()
        t[index] = value
        return t
    return change


DECODE_ERRORS = {
    "int q": (dict(q=lambda a: a["q"].int()), "q must be float32 or bfloat16"),
    "fp16 q": (dict(q=lambda a: a["q"].half()), "q must be float32 or bfloat16"),
    "cache dtype": (dict(k_cache=lambda a: a["k_cache"].bfloat16()), "k_cache must have q's dtype"),
    "q rank": (dict(q=lambda a: a["q"][0]), r"q must be \[batch, num_heads, head_dim\]"),
    "cache rank": (dict(v_cache=lambda a: a["v_cache"][0]), "v_cache must be"),
    "v shape": (dict(v_cache=lambda a: a["v_cache"][:-1]), "v_cache shape"),
    "head_dim": (dict(q=lambda a: a["q"][..., :32].contiguous()), "head_dim of k_cache"),
    "gqa": (dict(q=lambda a: torch.randn(2, 3, 64)), r"num_heads \(3\) must be a multiple of num_kv_heads \(2\)"),
    "int64 tables": (dict(block_tables=lambda a: a["block_tables"].long()), "block_tables must be int32"),
    "int64 lens": (dict(context_lens=lambda a: a["context_lens"].long()), "context_lens must be int32"),
    "batch": (dict(context_lens=lambda a: a["context_lens"][:1]), "context_lens has 1 entries but q has batch 2"),
    "tables batch": (dict(block_tables=lambda a: a["block_tables"][:1]), "block_tables has 1 rows"),
    "zero length": (dict(context_lens=set_entry("context_lens", (1,), 0)), r"context_lens\[1\] = 0 is out of range"),
    "too long": (dict(context_lens=set_entry("context_lens", (0,), 10**6)), r"context_lens\[0\] = 1000000 is out"),
    "block id": (dict(block_tables=set_entry("block_tables", (1, 1), 10**4)),
                 r"block_tables\[1, 1\] = 10000 is not a valid block id"),
    "padding read": (dict(block_tables=set_entry("block_tables", (1, 0), -1)), r"block_tables\[1, 0\] = -1"),
    "non-contiguous": (dict(q=lambda a: a["q"].transpose(0, 1).contiguous().transpose(0, 1)), "q must be contiguous"),
    "scale": (dict(scale=lambda a: float("nan")), "scale must be finite"),
}


@pytest.mark.parametrize("changes,message", DECODE_ERRORS.values(), ids=DECODE_ERRORS.keys())
def test_decode_attention_rejects(changes, message):
    with pytest.raises(RuntimeError, match=message):
        ops.decode_attention(*decode_args(**changes))


def prefill_args(**changes) -> list:
    q, k, v = torch.randn(10, 4, 64), torch.randn(10, 2, 64), torch.randn(10, 2, 64)
    args = dict(q=q, k=k, v=v, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32), causal=True, scale=0.125)
    for name, change in changes.items():
        args[name] = change(args)
    return list(args.values())


PREFILL_ERRORS = {
    "dtype": (dict(k=lambda a: a["k"].bfloat16()), "k must have q's dtype"),
    "tokens": (dict(v=lambda a: a["v"][:9], k=lambda a: a["k"][:9]), "k has 9 tokens but q has 10"),
    "gqa": (dict(k=lambda a: torch.randn(10, 3, 64), v=lambda a: torch.randn(10, 3, 64)), "must be a multiple"),
    "cu dtype": (dict(cu_seqlens=lambda a: a["cu_seqlens"].long()), "cu_seqlens must be int32"),
    "cu start": (dict(cu_seqlens=lambda a: torch.tensor([1, 4, 10], dtype=torch.int32)), "must start with 0"),
    "cu end": (dict(cu_seqlens=lambda a: torch.tensor([0, 4, 12], dtype=torch.int32)), "must end with the token count 10"),
    "cu order": (dict(cu_seqlens=lambda a: torch.tensor([0, 6, 4, 10], dtype=torch.int32)), "non-decreasing"),
}


@pytest.mark.parametrize("changes,message", PREFILL_ERRORS.values(), ids=PREFILL_ERRORS.keys())
def test_prefill_attention_rejects(changes, message):
    with pytest.raises(RuntimeError, match=message):
        ops.prefill_attention(*prefill_args(**changes))


NORM_ERRORS = {
    "int x": (dict(x=torch.ones(2, 8, dtype=torch.int32)), "x must be float32 or bfloat16"),
    "residual shape": (dict(residual=torch.randn(2, 9)), "residual must be|residual shape"),
    "residual dtype": (dict(residual=torch.randn(2, 8).bfloat16()), "residual must have x's dtype"),
    "weight size": (dict(weight=torch.randn(9)), r"weight must be \[8\]"),
    "bias dtype": (dict(bias=torch.randn(8).half()), "bias must be float32 or x's dtype"),
    "non-contiguous": (dict(x=torch.randn(8, 2).t(), residual=None), "x must be contiguous"),
    "eps": (dict(eps=-1.0), "eps must be finite and >= 0"),
}


@pytest.mark.parametrize("changes,message", NORM_ERRORS.values(), ids=NORM_ERRORS.keys())
def test_add_norm_rejects(changes, message):
    args = dict(x=torch.randn(2, 8), residual=torch.randn(2, 8), weight=torch.randn(8), bias=torch.randn(8), eps=1e-5,
                rms=False)
    with pytest.raises(RuntimeError, match=message):
        ops.add_norm(*{**args, **changes}.values())


@pytest.mark.parametrize("x,message", [(torch.randn(2, 7), "even last dimension"),
                                       (torch.ones(2, 8, dtype=torch.int64), "x must be float32 or bfloat16"),
                                       (torch.randn(8, 2).t(), "x must be contiguous")], ids=["odd", "int", "strided"])
def test_silu_and_mul_rejects(x, message):
    with pytest.raises(RuntimeError, match=message):
        ops.silu_and_mul(x)


LINEAR_ERRORS = {
    "3-d x": (dict(x=torch.randn(2, 3, 20)), r"x must be \[rows, in_features\]"),
    "int x": (dict(x=torch.ones(3, 20, dtype=torch.int64)), "x must be float32 or bfloat16"),
    "strided x": (dict(x=torch.randn(20, 3).t()), "x must be contiguous"),
    "dtype": (dict(x=torch.randn(3, 20).bfloat16()), "packed must have x's dtype"),
    "in_features": (dict(x=torch.randn(3, 21)), "not a packed weight with in_features 21"),
    "plain weight": (dict(packed=torch.randn(18, 20)), r"packed must be \[panels"),
    "out_features": (dict(out_features=40), "out_features 40 does not match packed.s 32 columns"),
    "bias": (dict(bias=torch.randn(17)), "bias has 17 entries, expected out_features 18"),
}


@pytest.mark.parametrize("changes,message", LINEAR_ERRORS.values(), ids=LINEAR_ERRORS.keys())
def test_packed_linear_rejects(changes, message):
    args = dict(x=torch.randn(3, 20), packed=ops.pack_linear_weight(torch.randn(18, 20)), out_features=18,
                bias=torch.randn(18), relu=False)
    with pytest.raises(RuntimeError, match=message):
        ops.packed_linear(*{**args, **changes}.values())
