"""Generation under DeepSpeed ZeRO-3, side by side in one run on `--world` CPU ranks (gloo) that this
command starts itself: same weights, same prompts, same thread settings, same forced length.

    python -m bench.zero3_generation --model opt-125m --world 2 [--batch 2] [--prompt-len 128]
                                     [--new-tokens 64] [--dtype bf16] [--tp 1 2] [--out ...]

Paths, each timed end to end on every rank (after a 2-token warm-up of the same path):
  zero3_hf     HF `generate` on the ZeRO-3 module: every forward re-gathers every layer (the
               DeepSpeed-Chat path without the hybrid engine).
  gather_once  GatheredParameters over all parameters, copy them into a plain (un-hooked) HF model
               built beforehand, HF `generate` there; time = gather + copy + generate.
  hybrid_tpN   HybridEngine(tp_size=N): eval() (reshard + inference model) + generate + train()
               (release); the TP group generates over the union of its ranks' prompts.
With --slow-new-tokens below --new-tokens, zero3_hf is timed on that shorter run and on a 1-token
run, and its time for --new-tokens is extrapolated from them (setup + prefill, then decode steps at
the measured per-token rate): tokens/s of every path is for --new-tokens.
Prompts are random token ids (never pad), different per rank, no padding; generation is greedy with
min_new_tokens = max_new_tokens (EOS cannot end it early). Tokens/s per rank counts this rank's
rows. peak_growth: RSS high-water growth of a rank during the timed run (gather_once's plain model,
a whole model per rank, is allocated beforehand and not in it). Greedy tokens are compared with
gather_once's: in fp32 gather_once and the hybrid paths must agree exactly (the benchmark fails
otherwise); in bf16 the agreement fraction is reported.
"""
import bench  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE before torch is imported)

import argparse
import time

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from bench.common import parse_dtype, print_table, write_json
from bench.zero3 import DTYPES, add_arguments, check_tp, peak_growth, run_benchmark, zero3_actor
from hybrid_engine.engine import HybridEngine

BASELINE = "gather_once"


def hf_generate(model, prompts: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy HF generate forced to n new tokens; returns the new tokens."""
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=model.config.pad_token_id)
    return out[:, prompts.shape[1]:]


def zero3_hf(module, prompts: torch.Tensor):
    def run(n: int):
        start = time.perf_counter()
        tokens = hf_generate(module, prompts, n)
        return tokens, {"generate_s": time.perf_counter() - start}
    return run


def gather_once(module, plain, prompts: torch.Tensor):
    import deepspeed

    params, copies = dict(module.named_parameters()), dict(plain.named_parameters())

    @torch.no_grad()
    def run(n: int):
        start = time.perf_counter()
        with deepspeed.zero.GatheredParameters(list(params.values())):
            for name, param in params.items():
                copies[name].copy_(param)
        gathered = time.perf_counter()
        tokens = hf_generate(plain, prompts, n)
        return tokens, {"prepare_s": gathered - start, "generate_s": time.perf_counter() - gathered}
    return run


def hybrid(he: HybridEngine, prompts: torch.Tensor):
    def run(n: int):
        start = time.perf_counter()
        he.eval()
        ready = time.perf_counter()
        out = he.generate(prompts, torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n, eos_token_id=[],
                          pad_token_id=he.config.pad_token_id)
        done = time.perf_counter()
        he.train()
        return out.sequences[:, prompts.shape[1]:], {
            "prepare_s": ready - start, "reshard_s": he.stats["reshard_seconds"], "generate_s": done - ready,
            "release_s": time.perf_counter() - done, "reshard_mib_received": he.stats["reshard_bytes_received"] / 2**20}
    return run


def measure(run, n: int) -> tuple[torch.Tensor, dict]:
    """One warm-up of 2 tokens, then the timed run; every rank starts together."""
    run(2)
    dist.barrier()
    with peak_growth() as memory:
        start = time.perf_counter()
        tokens, parts = run(n)
        seconds = time.perf_counter() - start
    return tokens, {"e2e_s": seconds, **parts, "peak_growth_mib": memory["peak_growth_bytes"] / 2**20,
                    "retained_mib": memory["retained_bytes"] / 2**20}


def worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    engine = zero3_actor(args.model, args.dtype)
    module, dtype = engine.module.eval(), DTYPES[args.dtype]  # eval: no dropout, as in generation
    engines = {tp: HybridEngine(engine, tp_size=tp, dtype=dtype, report=False) for tp in args.tp}  # collective
    g = torch.Generator().manual_seed(1000 + rank)
    prompts = torch.randint(3, module.config.vocab_size, (args.batch, args.prompt_len), generator=g)
    paths = {f"hybrid_tp{tp}": (hybrid(he, prompts), args.new_tokens) for tp, he in engines.items()}
    if not args.skip_gather_once:
        plain = AutoModelForCausalLM.from_config(module.config, dtype=dtype).eval()
        paths = {BASELINE: (gather_once(module, plain, prompts), args.new_tokens), **paths}
    if not args.skip_slow:
        paths = {"zero3_hf": (zero3_hf(module, prompts), args.slow_new_tokens or args.new_tokens), **paths}
    rows, tokens = [], {}
    for name, (run, n) in paths.items():
        tokens[name], row = measure(run, n)
        if n < args.new_tokens:
            row = extrapolate(row, measure(run, 1)[1], n, args.new_tokens)
        rows.append({"path": name, "rank": rank, "new_tokens": n, **row,
                     "tokens_per_s": args.batch * args.new_tokens / row["e2e_s"]})
    return {"rows": rows, "tokens": tokens}


def extrapolate(row: dict, one_token: dict, n: int, full: int) -> dict:
    """A path timed on n < full tokens, extrapolated to full: the time of a 1-token run (setup and
    prefill) plus full - 1 decode steps at the per-token rate between the 1-token and n-token runs,
    so that the prefill is weighed as in the other paths' runs of full tokens."""
    step = (row["e2e_s"] - one_token["e2e_s"]) / (n - 1)
    return {**row, "measured_e2e_s": row["e2e_s"], "one_token_e2e_s": one_token["e2e_s"],
            "decode_s_per_token": step, "e2e_s": one_token["e2e_s"] + (full - 1) * step}


def agreement(tokens: dict[str, torch.Tensor], reference: str) -> dict[str, float]:
    """Fraction of new tokens equal to the reference path's, over the positions both generated."""
    ref = tokens[reference]
    return {name: float((t == ref[:, :t.shape[1]]).float().mean()) for name, t in tokens.items()}


def summarize(results: list[dict], args: argparse.Namespace) -> list[dict]:
    """Per path, the slowest rank; ratios of tokens/s (per rank) against gather_once and zero3_hf."""
    worst: dict[str, dict] = {}
    for row in (r for result in results for r in result["rows"]):
        if row["path"] not in worst or row["e2e_s"] > worst[row["path"]]["e2e_s"]:
            worst[row["path"]] = dict(row)
    for row in worst.values():
        row["extrapolated"] = row["new_tokens"] != args.new_tokens  # e2e_s extrapolated from shorter runs
        for other in ("gather_once", "zero3_hf"):
            if other in worst:
                row[f"x_vs_{other}"] = row["tokens_per_s"] / worst[other]["tokens_per_s"]
        if BASELINE in results[0]["tokens"]:
            row["agreement"] = min(agreement(r["tokens"], BASELINE)[row["path"]] for r in results)
    return list(worst.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel degrees of the hybrid paths")
    p.add_argument("--batch", type=int, default=2, help="prompts per rank")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt (no padding)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt (forced, EOS disabled)")
    p.add_argument("--slow-new-tokens", type=int, default=None,
                   help="tokens for the slow zero3_hf path (default --new-tokens, at least 2); fewer marks its row "
                        "extrapolated: its time for --new-tokens is a 1-token run's plus --new-tokens - 1 decode "
                        "steps at the rate measured between the 1-token and the shorter run")
    p.add_argument("--skip-slow", action="store_true", help="leave out the zero3_hf path")
    p.add_argument("--skip-gather-once", action="store_true", help="leave out the gather_once path (no token check)")
    p.add_argument("--out", default=None, help="JSON path (default results/zero3-generation-<model>-w<world>-<dtype>.json)")
    args = p.parse_args(argv)
    parse_dtype(p, args)
    check_tp(p, args.world, args.tp)
    if args.slow_new_tokens is not None and not 2 <= args.slow_new_tokens <= args.new_tokens:
        p.error(f"--slow-new-tokens must be in [2, --new-tokens={args.new_tokens}], got {args.slow_new_tokens}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env, results = run_benchmark(worker, args)
    rows = [row for result in results for row in result["rows"]]
    summary = summarize(results, args)
    print(f"{args.model} {args.dtype} world {args.world}, per rank: batch {args.batch}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens; slowest rank per path (seconds; tokens/s per rank):")
    columns = ["path", "new_tokens", "e2e_s", "prepare_s", "reshard_s", "generate_s", "tokens_per_s",
               "x_vs_gather_once", "x_vs_zero3_hf", "agreement", "peak_growth_mib", "extrapolated"]
    print_table([{c: row.get(c, "-") for c in columns} for row in summary], columns)
    print("prepare_s: gather + copy (gather_once) or eval() incl. resharding (hybrid); agreement: fraction of greedy "
          f"tokens equal to {BASELINE}'s")
    token_rows = {f"rank{rank}": {k: v.tolist() for k, v in r["tokens"].items()} for rank, r in enumerate(results)}
    write_json(args.out or f"results/zero3-generation-{args.model}-w{args.world}-{args.dtype}.json",
               {"args": vars(args), "environment": env, "rows": rows, "summary": summary, "tokens": token_rows})
    must_match = [row["path"] for row in summary if row["path"] != "zero3_hf" and row.get("agreement", 1.0) < 1.0]
    if args.dtype == "fp32" and must_match:
        raise SystemExit(f"FAILED: fp32 greedy tokens of {must_match} differ from {BASELINE}'s")


if __name__ == "__main__":
    main()
