"""Generation: Hugging Face `generate` against hybrid_engine's Generator on the same random weights,
same prompts, same forced length, in one process with the same thread and OpenMP settings.

    python -m bench.generation --model opt-125m [--dtype bf16] [--batch 16] [--prompt-len 256]
                               [--new-tokens 256] [--out results/generation-opt-125m-fp32.json]
                               [--baseline vllm] [--baseline ctranslate2]

Both sides are timestamped at every next-token choice (HF: a logits processor; ours: the start of
each decode step): prefill = first stamp - start of the call, decode step = median interval
between stamps (the mean is reported too), so noise from other processes shows as spread rather
than bias. The floor of a decode step is the larger of (weights + KV bytes it must read) / read
bandwidth and its FLOPs / the peak GEMM rate of a large compute-bound product in the same dtype, both
measured in this run (before and after the two sides; the best of each), and printed with their
parts. Neither side can beat it: x_floor >= 1.

Memory: each side is measured from the same state, one copy of the weights resident and nothing
else (HF runs before our model exists; HF's model is freed before ours runs), and our growth
includes our KV cache and prepacked weight copies. Tokens: in fp32 greedy our tokens must equal
HF's (the run fails otherwise); in bf16 the agreement is reported.

Baselines (--baseline): other engines on the same saved weights and prompts, each in a subprocess of its
own venv (bench/baselines.py starts bench/baseline_runner.py there), stamped the same way and timed by the
same step_times; their startup is reported apart, their agreement with our tokens is reported, not enforced.
"""
import bench  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE before torch is imported)

import argparse
import collections
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LogitsProcessor, LogitsProcessorList

from bench import baselines
from bench.configs import MODELS, causal_lm
from bench.common import (median_seconds, parse_dtype, peak_gemm_rate, print_environment, print_table,
                          read_bandwidth, write_json)
from hybrid_engine import Generator, PagedKVCache, from_hf, kernels
from hybrid_engine.capability import DTYPES
from hybrid_engine.generation import Run
from hybrid_engine.memory import reset_peak, status_bytes
from hybrid_engine.models import layers, prepack
from rlhf.args import add_dtype


class StepClock(LogitsProcessor):
    """Timestamps: reset() at the start of a call, then one per generated token."""

    def __init__(self):
        self.ticks: list[float] = []

    def reset(self) -> None:
        self.ticks = [time.perf_counter()]

    def __call__(self, input_ids, scores):
        self.ticks.append(time.perf_counter())
        return scores


def measure(name: str, setup, clock: StepClock, batch: int, new_tokens: int) -> tuple[dict, torch.Tensor]:
    """Time one side and its memory growth from the RSS before setup() (which builds what this side
    allocates beyond the weights, e.g. our KV cache and prepacked copies, and returns run(n))."""
    before = reset_peak()
    run = setup()
    run(2)  # warm-up: allocator caches, lazily built kernels, KV cache pages
    clock.reset()
    sequences = run(new_tokens)
    row = step_times(name, clock.ticks, time.perf_counter(), batch * new_tokens)
    peak = status_bytes("VmHWM")
    row.update(rss_before_gib=before / 2**30, peak_rss_gib=peak / 2**30, run_growth_gib=(peak - before) / 2**30)
    return row, sequences


def step_times(name: str, ticks: list[float], end: float, tokens: int) -> dict:
    """One side's timing from its stamps (the start of the call, then one per next-token choice) and
    the end of the call: the same arithmetic for every side, ours and the baselines in their processes."""
    steps = [b - a for a, b in zip(ticks[1:], ticks[2:])]
    total_s = end - ticks[0]
    return {"side": name, "prefill_ms": (ticks[1] - ticks[0]) * 1e3,
            "decode_ms_per_step": statistics.median(steps) * 1e3, "decode_ms_mean": statistics.mean(steps) * 1e3,
            "tokens_per_s": tokens / total_s, "total_s": total_s}


def token_agreement(ours: torch.Tensor, theirs: torch.Tensor, prompt_len: int) -> dict:
    """How many generated tokens equal the other side's, and the first step where a row differs (or None)."""
    same = ours[:, prompt_len:] == theirs[:, prompt_len:]
    differs = (~same).any(0).nonzero()
    return {"token_agreement": same.float().mean().item(),
            "first_divergent_step": int(differs[0]) if len(differs) else None}


def clock_decode_steps(clock: StepClock) -> None:
    """Stamp the start of each of our decode steps (bench-only instrumentation)."""
    decode = Run.decode

    def stamped(run):
        clock(None, None)
        decode(run)

    Run.decode = stamped


def top_ops(run, steps: int, top: int = 12) -> list[dict]:
    """Self CPU time per decode step of the top ops of ours, from torch.profiler over `steps` steps."""
    from torch.profiler import profile

    totals: dict[str, float] = {}
    decode = Run.decode

    def profiled(r):
        with profile() as prof:
            decode(r)
        for event in prof.key_averages():
            totals[event.key] = totals.get(event.key, 0.0) + event.self_cpu_time_total

    Run.decode = profiled
    try:
        run(steps + 1)
    finally:
        Run.decode = decode
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
    return [{"op": name, "ms_per_step": us / steps / 1e3} for name, us in ranked]


class StepParts:
    """Exclusive wall time of the parts of our decode steps, from wrappers (bench-only) around the
    functions that do the work: every millisecond of a step lands in exactly one part, and what no
    wrapped function claims is the step's own Python (block tables, slots, bookkeeping)."""
    ROOT = "step: block tables, slots, Python"

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.stack: list[list] = []  # [part, start, seconds spent in wrapped callees]
        self.originals: list[tuple] = []

    def wrap(self, owner, attr: str, part) -> None:
        """Time owner.attr as `part` (a name, or a function of the call's arguments giving one)."""
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            name = part(*args) if callable(part) else part
            if not self.stack and name != self.ROOT:  # prefill: not a decode step
                return original(*args, **kwargs)
            frame = [name, time.perf_counter(), 0.0]
            self.stack.append(frame)
            try:
                return original(*args, **kwargs)
            finally:
                self.stack.pop()
                elapsed = time.perf_counter() - frame[1]
                self.seconds[name] += elapsed - frame[2]
                if self.stack:
                    self.stack[-1][2] += elapsed

        self.originals.append((owner, attr, original))
        setattr(owner, attr, timed)

    def unwrap(self) -> None:
        for owner, attr, original in reversed(self.originals):
            setattr(owner, attr, original)


def linear_part(names: dict[int, str]):
    return lambda module, *args: "GEMM " + names[id(module)].rsplit(".", 1)[-1]


def profile_parts(run, model, steps: int, args, limits: dict) -> list[dict]:
    """Where the time of `steps` decode steps goes, part by part, each against its own limit where
    it has one (bytes it must read / read bandwidth)."""
    names = {id(m): name for name, m in model.named_modules()}
    parts = StepParts()
    parts.wrap(Run, "decode", StepParts.ROOT)
    parts.wrap(Run, "sample", "sampling (choose, record, EOS)")
    parts.wrap(type(model), "compute_logits", "GEMM LM head")
    parts.wrap(type(model), "forward", "model: embeddings, final norm, Python")
    parts.wrap(layers.DecoderLayer, "forward", "layer glue (residual, Python)")
    parts.wrap(layers.Attention, "forward", "attention glue (split, views)")
    parts.wrap(layers.MLP, "forward", "MLP glue")
    parts.wrap(layers.Norm, "forward", "norms")
    parts.wrap(layers.Linear, "forward", linear_part(names))
    parts.wrap(layers.RowParallelLinear, "forward", linear_part(names))
    parts.wrap(kernels, "write_kv", "write_kv (new K/V into the cache)")
    parts.wrap(kernels, "decode_attention", "decode attention")
    try:
        run(steps + 1)
    finally:
        parts.unwrap()
    read = limits["read_bandwidth_gbs"] * 1e9
    bytes_of = collections.Counter()
    for m in model.modules():
        if isinstance(m, layers.Linear):
            bytes_of[linear_part(names)(m)] += m.weight.numel() * m.weight.element_size()
    head = model.output_embedding.weight
    bytes_of["GEMM LM head"] = head.numel() * head.element_size()
    bytes_of["decode attention"] = kv_bytes(model, args.batch, args.prompt_len + steps / 2, model.dtype)
    total = sum(parts.seconds.values())
    rows = []
    for name, seconds in sorted(parts.seconds.items(), key=lambda kv: -kv[1]):
        row = {"part": name, "ms_per_step": seconds / steps * 1e3, "share": seconds / total}
        if name in bytes_of:
            row["limit_ms"] = bytes_of[name] / read * 1e3
            row["x_limit"] = row["ms_per_step"] / row["limit_ms"]
        rows.append(row)
    return rows


def decode_weights(model) -> list[torch.Tensor]:
    """The weight matrices one decode step multiplies by (embedding tables are only gathered)."""
    mats = [t for name, t in model.state_dict().items() if t.dim() == 2 and not name.startswith("embed")]
    return mats + ([model.output_embedding.weight] if model.config.tie_word_embeddings else [])


def kv_bytes(model, batch: int, context: float, dtype: torch.dtype) -> float:
    """Bytes of keys and values that decode attention reads for batch rows of `context` tokens."""
    return 2 * model.num_layers * batch * context * model.num_kv_heads * model.head_dim * dtype.itemsize


def machine_limits(num_bytes: int, dtype: torch.dtype) -> dict:
    """Read bandwidth over a working set of num_bytes (capped at 1 GiB, far beyond what the caches
    hold) and the peak GEMM rate in dtype, measured now with one thread and with this run's threads
    (the best of both: a floor for either setting)."""
    threads = torch.get_num_threads()
    measured = []
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        measured.append({"read_bandwidth_gbs": read_bandwidth(min(num_bytes, 2**30)) / 1e9,
                         "peak_gemm_gflops": peak_gemm_rate(dtype) / 1e9})
    torch.set_num_threads(threads)
    return best_limits(*measured)


def best_limits(*measured: dict) -> dict:
    """The best of several measurements: load from other processes only ever lowers a rate."""
    return {key: max(m[key] for m in measured) for key in measured[0]}


def decode_work(model, args, dtype: torch.dtype) -> dict:
    """What one decode step at the mean context length must do: the bytes it reads (the weights it
    multiplies by, the K/V it attends to) and its FLOPs."""
    weights = decode_weights(model)
    context = args.prompt_len + args.new_tokens / 2
    attention_flops = 4 * args.batch * context * model.config.num_attention_heads * model.head_dim * model.num_layers
    return {"weight_bytes": sum(w.numel() * w.element_size() for w in weights),
            "kv_bytes_mean": kv_bytes(model, args.batch, context, dtype),
            "decode_flops": 2 * args.batch * sum(w.numel() for w in weights) + attention_flops}


def decode_floor(work: dict, limits: dict) -> dict:
    """Lower bound of one decode step: the larger of its bytes at the read bandwidth and its FLOPs at
    the peak GEMM rate, both measured in this run."""
    memory_ms = (work["weight_bytes"] + work["kv_bytes_mean"]) / (limits["read_bandwidth_gbs"] * 1e9) * 1e3
    compute_ms = work["decode_flops"] / (limits["peak_gemm_gflops"] * 1e9) * 1e3
    return {**work, **limits, "memory_floor_ms": memory_ms, "compute_floor_ms": compute_ms,
            "floor_ms": max(memory_ms, compute_ms)}


def gemm_passes(model, batch: int, dtype: torch.dtype) -> dict:
    """Measured time of multiplying [batch, in] by every weight matrix of a decode step once (the
    GEMM part of a step), with F.linear and with prepacked weights where this CPU can pack dtype (None
    where it cannot): what the weights alone cost."""
    weights = decode_weights(model)
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1]).to(dtype) for w in weights}
    gemm_pass = median_seconds(lambda: [F.linear(inputs[w.shape[1]], w) for w in weights], repeat=3)
    if not prepack.available(weights[0].device, dtype):
        return {"weights_gemm_pass_ms": gemm_pass * 1e3, "weights_gemm_pass_prepacked_ms": None}
    packed = [prepack.PackedWeight() for _ in weights]
    packed_pass = median_seconds(lambda: [prepack.linear(inputs[w.shape[1]], w, None, "none", p)
                                          for w, p in zip(weights, packed)], repeat=3)
    return {"weights_gemm_pass_ms": gemm_pass * 1e3, "weights_gemm_pass_prepacked_ms": packed_pass * 1e3}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="opt-125m", help="configuration to build (random weights)")
    add_dtype(p, "Weights and KV cache dtype, both sides")
    p.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    p.add_argument("--prompt-len", type=int, default=256, help="tokens per prompt (no padding)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per prompt (EOS disabled)")
    p.add_argument("--block-size", type=int, default=16, help="KV cache block size (tokens)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for both sides (default: torch's default; 1 is faster on a loaded machine)")
    p.add_argument("--no-prepack", action="store_true", help="ours without prepacked (oneDNN-blocked) weights")
    p.add_argument("--skip-hf", action="store_true", help="only run ours (for profiling; no ratios)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile this many of our decode steps: time per part of a step against its limit, "
                        "and the top ops by torch.profiler")
    p.add_argument("--baseline", action="append", default=[], choices=baselines.ENGINES,
                   help="also run this engine on the same weights and prompts in a subprocess (repeatable): vllm and "
                        "ctranslate2 in their venvs under --baseline-venvs (bash scripts/make_baseline_venv.sh), "
                        "transformers in this one; its startup is reported apart from its timing")
    p.add_argument("--baseline-venvs", default=str(baselines.DEFAULT_VENVS),
                   help="directory holding the baselines' venvs, one per engine (default: %(default)s)")
    p.add_argument("--baseline-timeout", type=float, default=1800,
                   help="seconds a baseline may take, startup included (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON path (default results/generation-<model>-<dtype>.json)")
    args = p.parse_args()
    parse_dtype(p, args)
    return args


def hf_side(args, hf, prompts: torch.Tensor, mask: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """transformers' generate, every row forced to --new-tokens: (its row, its tokens)."""
    clock = StepClock()

    def theirs(n):
        with torch.inference_mode():
            return hf.generate(input_ids=prompts, attention_mask=mask, do_sample=False, max_new_tokens=n,
                               min_new_tokens=n, eos_token_id=None, pad_token_id=hf.config.pad_token_id,
                               logits_processor=LogitsProcessorList([clock]))
    return measure("hf_generate", lambda: theirs, clock, args.batch, args.new_tokens)


def our_side(args, model, prompts: torch.Tensor, mask: torch.Tensor):
    """Our Generator, every row forced to --new-tokens: (its row, its tokens, the generator, its run(n))."""
    clock, built = StepClock(), {}

    def ours(n):
        return built["generator"].generate(prompts, mask, max_new_tokens=n, min_new_tokens=n,
                                           eos_token_id=[]).sequences

    def setup():
        # Inside the measurement: the KV cache and the prepacked weight copies count as ours. The cache
        # is allocated once, as in an RLHF loop where every iteration reuses it.
        blocks = (-(-(args.prompt_len + args.new_tokens) // args.block_size) + 1) * args.batch
        built["generator"] = Generator(model, block_size=args.block_size, prepack_weights=not args.no_prepack,
                                       kv_cache_bytes=blocks * PagedKVCache.block_bytes(model, args.block_size))
        return ours
    clock_decode_steps(clock)
    row, tokens = measure("hybrid_engine", setup, clock, args.batch, args.new_tokens)
    return row, tokens, built["generator"], ours


def print_rows(args, rows: list[dict], floor: dict) -> None:
    print(f"{args.model} {args.dtype} batch {args.batch} prompt {args.prompt_len} new {args.new_tokens} "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, threads {torch.get_num_threads()})")
    print_table(rows, ["side", "prefill_ms", "decode_ms_per_step", "decode_ms_mean", "tokens_per_s", "peak_rss_gib",
                       "run_growth_gib", "x_floor", "ours_faster_decode", "ours_faster_prefill", "startup_s"])
    print("floor per decode step: " + ", ".join(f"{k}={v:.4g}" for k, v in floor.items()))


def speedups(their_row: dict, our_row: dict, agreement: dict) -> dict:
    """Ours against one other side (> 1: ours faster), also put in its row for the table."""
    result = {**agreement, "speedup_decode": their_row["decode_ms_per_step"] / our_row["decode_ms_per_step"],
              "speedup_prefill": their_row["prefill_ms"] / our_row["prefill_ms"],
              "speedup_tokens_per_s": our_row["tokens_per_s"] / their_row["tokens_per_s"]}
    their_row.update(ours_faster_decode=result["speedup_decode"], ours_faster_prefill=result["speedup_prefill"])
    return result


def print_speedups(side: str, result: dict) -> None:
    print(f"ours vs {side}: decode step {result['speedup_decode']:.2f}x faster, prefill "
          f"{result['speedup_prefill']:.2f}x, tokens/s {result['speedup_tokens_per_s']:.2f}x; our tokens equal "
          f"its: {result['token_agreement']:.1%} (first divergent step: {result['first_divergent_step']})"
          + (f"; started in {result['startup_s']:.1f} s (not timed)" if "startup_s" in result else ""))


def baseline_sides(args, pythons: dict[str, str], hf, prompts: torch.Tensor) -> list[tuple[dict, torch.Tensor]]:
    """The baselines one at a time on one saved copy of the weights, each process gone before the next
    side starts."""
    if not pythons:
        return []
    kv_cache_bytes = baselines.kv_cache_bytes(hf, prompts.numel() + args.batch * args.new_tokens)
    with tempfile.TemporaryDirectory(prefix="baselines-") as tmp:
        model_dir = baselines.save_checkpoint(hf, tmp)
        return [baseline_side(args, engine, python, model_dir, prompts, kv_cache_bytes)
                for engine, python in pythons.items()]


def baseline_side(args, engine: str, python: str, model_dir: str, prompts: torch.Tensor,
                  kv_cache_bytes: int) -> tuple[dict, torch.Tensor]:
    """Another engine on the same weights and prompts in its own process (bench/baselines.py), timed from
    its stamps as ours is: (its row, its tokens after the prompts)."""
    print(f"--baseline {engine}: starting it in {python} (its startup is timed apart)", flush=True)
    result = baselines.run_baseline(engine, python, model_dir, prompts, args.new_tokens, args.dtype, kv_cache_bytes,
                                    args.baseline_timeout)
    lengths = {len(g) for g in result["generated"]}
    if len(result["stamps"]) != args.new_tokens + 1 or lengths != {args.new_tokens}:
        # One stamp per step is what makes its ms/step comparable: a step that chose tokens for only some
        # rows (a prompt admitted late) or a row cut short would time something else.
        raise SystemExit(f"--baseline {engine}: {len(result['stamps']) - 1} token choices timed and rows of "
                         f"{sorted(lengths)} tokens, expected {args.new_tokens} of each")
    row = step_times(engine, result["stamps"], result["end"], args.batch * args.new_tokens)
    row.update(version=result["version"], startup_s=result["startup_s"])
    return row, torch.cat([prompts, torch.tensor(result["generated"])], 1)


def profile(ours, model, args, limits: dict) -> dict:
    parts = profile_parts(ours, model, args.profile, args, limits)
    print(f"ours, exclusive wall time per decode step by part over {args.profile} steps (limit: bytes the part "
          f"must read at {limits['read_bandwidth_gbs']:.3g} GB/s):")
    print_table([{"limit_ms": "", "x_limit": "", **row} for row in parts], ["part", "ms_per_step", "share", "limit_ms",
                                                                            "x_limit"])
    ops = top_ops(ours, args.profile)
    print(f"ours, self CPU time per decode step by op over {args.profile} steps (torch.profiler, its overhead "
          f"included):")
    print_table(ops, ["op", "ms_per_step"])
    return {"ours_parts": parts, "ours_top_ops": ops}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # A missing venv fails now, not after minutes of building and timing.
    pythons = {engine: baselines.python_of(engine, Path(args.baseline_venvs)) for engine in args.baseline}
    env, dtype = print_environment(args.dtype), DTYPES[args.dtype]
    torch.manual_seed(0)
    hf = causal_lm(args.model).eval().to(dtype)
    prompts = torch.randint(3, hf.config.vocab_size, (args.batch, args.prompt_len))
    mask = torch.ones_like(prompts)
    # The machine's limits, measured before and after the runs (the best of both: load from other
    # processes only lowers a rate), over a working set as large as the weights (before) and as a
    # whole decode step's reads (after).
    limits_before = machine_limits(sum(t.numel() * t.element_size() for t in hf.parameters()), dtype)
    baseline_runs = baseline_sides(args, pythons, hf, prompts)
    # Each side starts from one copy of the weights and nothing else: HF's run first, before our
    # model exists; then HF's model is freed before ours is measured.
    hf_run = None if args.skip_hf else hf_side(args, hf, prompts, mask)
    model = from_hf(hf, dtype=dtype)
    del hf
    our_row, our_tokens, generator, ours = our_side(args, model, prompts, mask)
    hf_runs = [] if hf_run is None else [hf_run]
    others = hf_runs + baseline_runs
    rows = [row for row, _ in hf_runs] + [our_row] + [row for row, _ in baseline_runs]
    work = decode_work(generator.model, args, dtype)
    limits = best_limits(limits_before, machine_limits(work["weight_bytes"] + int(work["kv_bytes_mean"]), dtype))
    floor = {**decode_floor(work, limits), **gemm_passes(generator.model, args.batch, dtype)}
    for row in rows:
        row["x_floor"] = row["decode_ms_per_step"] / floor["floor_ms"]
    versus = {row["side"]: speedups(row, our_row, token_agreement(our_tokens, tokens, args.prompt_len))
              for row, tokens in others}
    for row, _ in baseline_runs:
        versus[row["side"]].update(version=row["version"], startup_s=row["startup_s"])
    print_rows(args, rows, floor)
    for side, comparison in versus.items():
        print_speedups(side, comparison)
    result = {"args": vars(args), "environment": env, "rows": rows, "floor": floor, "ours_stats": generator.stats,
              **versus.get("hf_generate", {}), "baselines": {row["side"]: versus[row["side"]] for row, _ in baseline_runs}}
    agreement = versus.get("hf_generate")
    if args.profile:
        result.update(profile(ours, generator.model, args, limits))
    write_json(args.out or f"results/generation-{args.model}-{args.dtype}.json", result)
    if agreement and dtype == torch.float32 and agreement["token_agreement"] < 1:
        # fp32 greedy must reproduce HF exactly; a speed-up of a wrong model means nothing.
        raise SystemExit(f"FAIL: our fp32 greedy tokens differ from HF's ({agreement})")


if __name__ == "__main__":
    main()
