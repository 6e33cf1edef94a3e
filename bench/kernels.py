"""CPU attention kernels: our C++ ops against the plain-torch reference and against what Hugging Face
models run (scaled_dot_product_attention over a contiguous cache), side by side in one run.

Decode attention is memory-bandwidth bound, so besides time it reports the GB/s of K/V bytes
read and their fraction of the copy bandwidth measured in the same run (a large copy into a
preallocated buffer, read + write counted, at the start and at the end; the fraction uses the
higher of the two). This CPU's L3 is larger than one layer's cache at most shapes, which would
measure cache rather than memory bandwidth: every implementation cycles through enough
independent per-layer caches (--cache-bytes) that each call reads from memory, as a model's
24 layers would.

Attention is timed through the public functions (hybrid_engine.kernels: argument validation and
dispatch included, as in every model call), with the bare torch.ops call as a second column. The
plain-torch reference is a per-sequence Python loop without warm-up: reported for scale only, it
is in no ratio.

It also times the fused elementwise ops (add_norm, silu_and_mul) against plain torch in the
native dtype, as bare torch.ops calls: the measurement that decided whether they get C++ kernels
(see csrc/cpu/ops.h; the CPU dispatcher now keeps only the attention kernels).

    python -m bench.kernels            # full run (several minutes)
    python -m bench.kernels --quick    # smoke run
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import itertools  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import hybrid_engine  # noqa: E402,F401  (registers torch.ops.hybrid_engine)
from bench.common import copy_bandwidth, median_seconds, print_environment, print_table, write_json  # noqa: E402
from hybrid_engine import kernels  # noqa: E402
from hybrid_engine.capability import DTYPES as ALL_DTYPES  # noqa: E402
from hybrid_engine.kernels import native, reference  # noqa: E402
from hybrid_engine.memory import status_bytes  # noqa: E402

DTYPES = {name: ALL_DTYPES[name] for name in ("fp32", "bf16")}  # the CPU kernels' dtypes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64], help="decode batch sizes")
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048], help="decode context lengths (tokens)")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES), help="data types to run")
    p.add_argument("--heads", type=int, default=32, help="query heads (OPT-1.3b: 32)")
    p.add_argument("--kv-heads", type=int, default=32, help="key/value heads (GQA when fewer than --heads)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (OPT-1.3b: 64)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    p.add_argument("--prefill-seqs", type=int, default=4, help="sequences in the prefill batch")
    p.add_argument("--prefill-len", type=int, default=512, help="tokens per prefill sequence")
    p.add_argument("--elementwise-tokens", type=int, nargs="+", default=[16, 4096],
                   help="token counts (rows) for the fused elementwise ops")
    p.add_argument("--repeat", type=int, default=10, help="timed calls per measurement (median reported)")
    p.add_argument("--ref-repeat", type=int, default=3, help="timed calls of the slow plain-torch reference")
    p.add_argument("--cache-bytes", type=float, default=1.0e9,
                   help="cycle through per-layer caches totalling at least this many bytes (defeats the L3)")
    p.add_argument("--quick", action="store_true", help="short smoke run: small shapes, few repeats")
    p.add_argument("--out", default="results/kernels.json", help="where to write the JSON results")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.contexts, args.repeat, args.ref_repeat = [1, 16], [128, 512], 3, 1
        args.prefill_seqs, args.prefill_len, args.cache_bytes = 2, 128, 2.0e8
        args.elementwise_tokens = [16, 512]
    return args


def rotating(make: Callable[[], tuple], layer_bytes: int, cache_bytes: float) -> Callable[[], tuple]:
    """A function returning the next of enough independent inputs to total cache_bytes."""
    layers = [make() for _ in range(max(1, math.ceil(cache_bytes / layer_bytes)))]
    return itertools.cycle(layers).__next__


def paged_layer(batch: int, context: int, args: argparse.Namespace, dtype: torch.dtype) -> tuple:
    blocks_per_seq = -(-context // args.block_size)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    block_tables = torch.randperm(num_blocks, dtype=torch.int32).view(batch, blocks_per_seq)  # shuffled
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype), block_tables


def decode_row(batch: int, context: int, dtype_name: str, args: argparse.Namespace, bandwidth: float) -> dict:
    dtype = DTYPES[dtype_name]
    q = torch.randn(batch, args.heads, args.head_dim, dtype=dtype)
    context_lens = torch.full((batch,), context, dtype=torch.int32)
    kv_bytes = 2 * batch * context * args.kv_heads * args.head_dim * q.element_size()
    scale = 1 / math.sqrt(args.head_dim)

    next_paged = rotating(lambda: paged_layer(batch, context, args, dtype), kv_bytes, args.cache_bytes)
    ours = median_seconds(lambda: kernels.decode_attention(q, *next_paged(), context_lens, scale=scale), args.repeat)
    raw = median_seconds(lambda: torch.ops.hybrid_engine.decode_attention(q, *next_paged(), context_lens, scale),
                         args.repeat)
    ref = median_seconds(lambda: reference.decode_attention(q, *next_paged(), context_lens, scale=scale),
                         args.ref_repeat, warmup=0)
    layer = next_paged()
    error = max_error(kernels.decode_attention(q, *layer, context_lens, scale=scale),
                      reference.decode_attention(q, *layer, context_lens, scale=scale))
    del next_paged, layer

    # Hugging Face layout: [B, H, ctx, D] contiguous K/V with the KV heads repeated for GQA.
    contiguous = (batch, args.heads, context, args.head_dim)
    next_contiguous = rotating(lambda: (torch.randn(contiguous, dtype=dtype), torch.randn(contiguous, dtype=dtype)),
                               kv_bytes * args.heads // args.kv_heads, args.cache_bytes)
    q4 = q.unsqueeze(2)
    sdpa = median_seconds(lambda: F.scaled_dot_product_attention(q4, *next_contiguous(), scale=scale), args.repeat)
    del next_contiguous
    return {"batch": batch, "context": context, "dtype": dtype_name,
            "ours_ms": ours * 1e3, "ours_raw_op_ms": raw * 1e3, "sdpa_ms": sdpa * 1e3, "ref_loop_ms": ref * 1e3,
            "ours_GBps": kv_bytes / ours / 1e9, "sdpa_GBps": kv_bytes / sdpa / 1e9,
            "ours_bw_frac": kv_bytes / ours / bandwidth, "sdpa_bw_frac": kv_bytes / sdpa / bandwidth,
            "sdpa/ours": sdpa / ours, "max_error_vs_ref": error}


def max_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference from the reference: what is timed must also be right."""
    return (ours.float() - expected.float()).abs().max().item()


def prefill_row(dtype_name: str, args: argparse.Namespace) -> dict:
    dtype, seqs, length = DTYPES[dtype_name], args.prefill_seqs, args.prefill_len
    total = seqs * length
    q = torch.randn(total, args.heads, args.head_dim, dtype=dtype)
    k, v = (torch.randn(total, args.kv_heads, args.head_dim, dtype=dtype) for _ in range(2))
    cu_seqlens = torch.arange(0, total + 1, length, dtype=torch.int32)
    scale = 1 / math.sqrt(args.head_dim)
    ours = median_seconds(lambda: kernels.prefill_attention(q, k, v, cu_seqlens, causal=True, scale=scale),
                          args.repeat)
    raw = median_seconds(lambda: torch.ops.hybrid_engine.prefill_attention(q, k, v, cu_seqlens, True, scale),
                         args.repeat)
    ref = median_seconds(lambda: reference.prefill_attention(q, k, v, cu_seqlens, causal=True, scale=scale),
                         args.ref_repeat, warmup=0)

    def batched(t: torch.Tensor) -> torch.Tensor:  # equal lengths: the padded batch has no padding
        t = t.view(seqs, length, t.shape[1], args.head_dim).transpose(1, 2)
        return t.repeat_interleave(args.heads // t.shape[1], dim=1)

    qb, kb, vb = batched(q), batched(k), batched(v)
    sdpa = median_seconds(lambda: F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale), args.repeat)
    flops = 4 * seqs * args.heads * args.head_dim * length * (length + 1) / 2  # QK^T and PV, causal half
    return {"tokens": f"{seqs}x{length}", "dtype": dtype_name, "ours_ms": ours * 1e3, "ours_raw_op_ms": raw * 1e3,
            "sdpa_ms": sdpa * 1e3, "ref_loop_ms": ref * 1e3, "ours_GFLOPs": flops / ours / 1e9,
            "sdpa_GFLOPs": flops / sdpa / 1e9, "sdpa/ours": sdpa / ours,
            "max_error_vs_ref": max_error(kernels.prefill_attention(q, k, v, cu_seqlens, causal=True, scale=scale),
                                          reference.prefill_attention(q, k, v, cu_seqlens, causal=True, scale=scale))}


def paired_median_seconds(a: Callable[[], object], b: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median times of a and b called alternately, so that load from other processes hits both alike."""
    times_a, times_b = [], []
    for _ in range(repeat):
        times_a.append(median_seconds(a, 1, warmup=1 if not times_a else 0))
        times_b.append(median_seconds(b, 1, warmup=1 if not times_b else 0))
    return statistics.median(times_a), statistics.median(times_b)


def elementwise_rows(dtype_name: str, args: argparse.Namespace) -> list[dict]:
    """The fused elementwise ops: plain torch in the native dtype (kernels.native) against our C++ op,
    at decode ([16, ...]) and prefill ([4096, ...]) shapes of a LLaMA-7B-like MLP (hidden 2048 here)."""
    dtype, rows = DTYPES[dtype_name], []
    for tokens in args.elementwise_tokens:
        x, residual = torch.randn(tokens, 2048, dtype=dtype), torch.randn(tokens, 2048, dtype=dtype)
        weight, bias = torch.randn(2048, dtype=dtype), torch.randn(2048, dtype=dtype)
        gate_up = torch.randn(tokens, 2 * 5504, dtype=dtype)
        cases = {
            "add_rms_norm": (lambda: native.add_rms_norm(x, residual, weight, 1e-6),
                             lambda: torch.ops.hybrid_engine.add_norm(x, residual, weight, None, 1e-6, True)),
            "add_layer_norm": (lambda: native.add_layer_norm(x, residual, weight, bias, 1e-5),
                               lambda: torch.ops.hybrid_engine.add_norm(x, residual, weight, bias, 1e-5, False)),
            "silu_and_mul": (lambda: native.silu_and_mul(gate_up), lambda: torch.ops.hybrid_engine.silu_and_mul(gate_up)),
        }
        for op, (torch_fn, ours_fn) in cases.items():
            torch_s, ours_s = paired_median_seconds(torch_fn, ours_fn, args.repeat * (20 if tokens <= 64 else 2))
            rows.append({"op": op, "tokens": tokens, "dtype": dtype_name, "torch_us": torch_s * 1e6,
                         "ours_us": ours_s * 1e6, "torch/ours": torch_s / ours_s})
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = print_environment()
    print(f"decode: heads {args.heads}, kv heads {args.kv_heads}, head_dim {args.head_dim}, "
          f"block_size {args.block_size}, shuffled block tables; caches cycled over >= {args.cache_bytes:.2g} bytes")
    bandwidth_start = copy_bandwidth()
    print(f"copy bandwidth (512 MB, read + write): {bandwidth_start / 1e9:.1f} GB/s")
    decode = [decode_row(b, c, d, args, bandwidth_start)
              for d in args.dtypes for b in args.batches for c in args.contexts]
    prefill = [prefill_row(d, args) for d in args.dtypes]
    elementwise = [row for d in args.dtypes for row in elementwise_rows(d, args)]
    bandwidth_end = copy_bandwidth()
    bandwidth = max(bandwidth_start, bandwidth_end)
    for row in decode:  # fractions against the higher measurement: the conservative one
        for impl in ("ours", "sdpa"):
            row[f"{impl}_bw_frac"] = row[f"{impl}_GBps"] * 1e9 / bandwidth
    print(f"copy bandwidth at the end: {bandwidth_end / 1e9:.1f} GB/s (fractions below use "
          f"{bandwidth / 1e9:.1f})\n\ndecode attention (ours = hybrid_engine.kernels, validation and dispatch "
          "included, as every model call pays; ours_raw_op = the bare C++ op; sdpa = contiguous cache, "
          "sdpa/ours > 1 means ours is faster; ref_loop = the plain-torch reference, a per-sequence Python "
          "loop timed without warm-up: a correctness oracle, not a baseline)")
    print_table(decode, list(decode[0]))
    print("\nprefill attention, causal (sdpa = padded batch, equal lengths)")
    print_table(prefill, list(prefill[0]))
    print("\nfused elementwise ops: plain torch in the native dtype vs our C++ kernels (hidden 2048, MLP 5504)")
    print_table(elementwise, list(elementwise[0]))
    peak = status_bytes("VmHWM")
    print(f"\npeak RSS: {peak / 2**30:.2f} GiB")
    write_json(args.out, {"environment": env, "args": vars(args), "copy_bandwidth_GBps":
                          [bandwidth_start / 1e9, bandwidth_end / 1e9], "decode": decode, "prefill": prefill,
                          "elementwise": elementwise,
                          "peak_rss_bytes": peak})


if __name__ == "__main__":
    main()
