"""Repartition under DeepSpeed ZeRO-3: ours against the two ways the field fills inference weights,
side by side in one run, on `--world` CPU ranks (gloo) that this command starts itself.

    python -m bench.reshard --model opt-125m --world 2 --tp 2 [--dtype bf16] [--bucket-mb 64]
                            [--gather-layers 1] [--repeat 3] [--out results/reshard-opt-125m-w2-tp2-bf16.json]

Every rank fills the same preallocated tensor-parallel inference weights three ways:
  ours          Resharder: per bucket one pack, one all_to_all_single, one unpack; each rank receives
                only the bytes of its slices that it does not hold.
  layer_groups  DeepSpeed-HE: GatheredParameters over groups of --gather-layers layers (its
                tp_gather_partition_size), copy this rank's TP slices out, release.
  per_param     OpenRLHF / TRL: GatheredParameters over one parameter at a time, copy its slice.
The three results must be identical (bit for bit) or the benchmark fails. Seconds are the median
of --repeat runs after one warm-up, each run ending in a barrier (time until every rank has its
weights). Bytes received per rank: ours as counted by the Resharder; the baselines' all_gathers
deliver (N-1)/N of each padded parameter to every rank (computed). Extra memory per rank: computed
(ours: exchange buffers; layer_groups: the largest group's full parameters; per_param: the largest
full parameter) and measured (RSS high-water growth over the warm-up and the timed runs, which also
counts allocator caching; `retained` is the growth left once freed heap is handed back).
"""
import bench  # noqa: F401  (sets OMP_WAIT_POLICY=PASSIVE before torch is imported)

import argparse
import re

import torch
import torch.distributed as dist

from bench.common import median_seconds, parse_dtype, print_table, write_json
from bench.zero3 import DTYPES, add_arguments, check_tp, peak_growth, run_benchmark, zero3_actor
from hybrid_engine.models import WeightMap, WeightSource, empty_model, weight_map
from hybrid_engine.reshard import Resharder, new_tp_group

Placement = tuple[str, int, WeightSource]  # (inference tensor, first row in it, source)
LAYER = re.compile(r"\.layers\.(\d+)\.")


def placements(wmap: WeightMap, tp: int) -> dict[str, list[Placement]]:
    """Where each training parameter's TP slice goes, keyed by parameter name, in map order."""
    where: dict[str, list[Placement]] = {}
    for target, sources in wmap.items():
        row = 0
        for source in sources:
            where.setdefault(source.name, []).append((target, row, source))
            row += source.shard_shape(tp)[0]
    return where


def layer_groups(names: list[str], layers_per_group: int) -> list[list[str]]:
    """Parameter names grouped by decoder layer, `layers_per_group` layers at a time; parameters
    outside the layers (embeddings, final norm, LM head) form one more group."""
    groups: dict[object, list[str]] = {}
    for name in names:
        match = LAYER.search(name)
        groups.setdefault(int(match[1]) // layers_per_group if match else "rest", []).append(name)
    return list(groups.values())


def unique(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return list({id(p): p for p in params}.values())


def gathered_copy(params: dict, where: dict[str, list[Placement]], groups: list[list[str]],
                  targets: dict[str, torch.Tensor], tp_rank: int, tp: int) -> None:
    """Gather each group's parameters whole, copy this rank's slices into the targets, release."""
    import deepspeed

    for names in groups:
        with deepspeed.zero.GatheredParameters(unique([params[n] for n in names])):
            for name in names:
                for target, row, source in where[name]:
                    piece = source.shard(params[name].data, tp_rank, tp)
                    targets[target].narrow(0, row, piece.shape[0]).copy_(piece)


def full_bytes(param: torch.nn.Parameter) -> int:
    """Bytes of a parameter gathered whole (padded to a multiple of the world size, as all_gather fills it)."""
    return param.partition_numel() * dist.get_world_size(param.ds_process_group) * param.ds_tensor.element_size()


def gathered_cost(params: dict, groups: list[list[str]], world: int) -> tuple[int, int]:
    """(bytes all_gather delivers to each rank, largest group's full bytes) for gathering `groups`."""
    sizes = [sum(full_bytes(p) for p in unique([params[n] for n in names])) for names in groups]
    return sum(sizes) * (world - 1) // world, max(sizes)


def timed(run, repeat: int) -> dict:
    def run_to_barrier():
        run()
        dist.barrier()

    with peak_growth() as memory:
        seconds = median_seconds(run_to_barrier, repeat)
    return {"seconds": seconds, "measured_peak_bytes": memory["peak_growth_bytes"],
            "retained_bytes": memory["retained_bytes"]}


def worker(rank: int, world: int, args: argparse.Namespace) -> dict:
    engine = zero3_actor(args.model, args.dtype)
    module, tp, tp_rank = engine.module, args.tp, rank % args.tp
    wmap = weight_map(module.config)
    model = empty_model(module.config, tp_rank, tp, new_tp_group(tp), DTYPES[args.dtype])
    targets = dict(model.named_buffers())
    params = dict(module.named_parameters(remove_duplicate=False))
    resharder = Resharder(module, wmap, tp_rank=tp_rank, tp_size=tp, bucket_bytes=args.bucket_mb << 20)
    rows = [{"side": "ours", "rank": rank, **measure_ours(resharder, wmap, targets, args.repeat)}]
    reference = {name: targets[name].clone() for name in wmap}
    where = placements(wmap, tp)
    baselines = {"layer_groups": layer_groups(list(where), args.gather_layers), "per_param": [[n] for n in where]}
    for side, groups in baselines.items():
        fill_nan(targets, wmap)
        row = timed(lambda: gathered_copy(params, where, groups, targets, tp_rank, tp), args.repeat)
        row["bytes_received"], row["computed_peak_bytes"] = gathered_cost(params, groups, world)
        row["mismatched"] = [name for name in wmap if not identical(targets[name], reference[name])]
        rows.append({"side": side, "rank": rank, **row, "groups": len(groups)})
    inference_bytes = sum(targets[name].numel() * targets[name].element_size() for name in wmap)
    return {"rows": rows, "inference_weight_bytes": inference_bytes, "buckets": resharder.stats.buckets,
            "decoder_layers": decoder_layer_bytes(module, wmap, targets, params, tp_rank, tp, world)}


def identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN included: the padding rows of a vocabulary slice, which no side writes, stay NaN."""
    return torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def fill_nan(targets: dict[str, torch.Tensor], wmap: WeightMap) -> None:
    """A slice nobody writes then cannot pass the comparison."""
    for name in wmap:
        targets[name].fill_(float("nan"))


def measure_ours(resharder: Resharder, wmap: WeightMap, targets: dict[str, torch.Tensor], repeat: int) -> dict:
    fill_nan(targets, wmap)
    resharder.release()  # its exchange buffers are allocated inside the measurement
    row = timed(lambda: resharder.reshard(targets), repeat)
    stats = resharder.stats
    return {**row, "bytes_received": stats.bytes_received, "computed_peak_bytes": stats.peak_buffer_bytes}


def decoder_layer_bytes(module, wmap: WeightMap, targets: dict, params: dict, tp_rank: int, tp: int,
                        world: int) -> dict:
    """Bytes received for the decoder layers alone (ours measured, a full gather computed), without
    the embeddings and the LM head."""
    layers = {name: sources for name, sources in wmap.items() if LAYER.search(sources[0].name)}
    ours = Resharder(module, layers, tp_rank=tp_rank, tp_size=tp).reshard(targets).bytes_received
    gathered, _ = gathered_cost(params, [[s.name for sources in layers.values() for s in sources]], world)
    return {"ours_bytes_received": ours, "gather_bytes_received": gathered}


def summarize(results: list[dict]) -> dict:
    """Per side, the worst rank (the step waits for it), and ours against each baseline."""
    sides = {}
    for row in (r for result in results for r in result["rows"]):
        worst = sides.setdefault(row["side"], {"side": row["side"]})
        for key in ("seconds", "bytes_received", "computed_peak_bytes", "measured_peak_bytes"):
            worst[key] = max(worst.get(key, 0), row[key])
    ours = sides["ours"]
    for side in sides.values():
        side["time_vs_ours"] = side["seconds"] / ours["seconds"]
        side["bytes_vs_ours"] = side["bytes_received"] / max(ours["bytes_received"], 1)
        side["computed_peak_vs_ours"] = side["computed_peak_bytes"] / max(ours["computed_peak_bytes"], 1)
    return sides


BYTE_COLUMNS = ("bytes_received", "computed_peak_bytes", "measured_peak_bytes", "retained_bytes")


def mib_columns(rows: list[dict]) -> list[dict]:
    return [{k: v / 2**20 if k in BYTE_COLUMNS else v for k, v in row.items()} for row in rows]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel degree of the inference weights (divides --world)")
    p.add_argument("--bucket-mb", type=int, default=64, help="our bound on source bytes per all_to_all (MiB)")
    p.add_argument("--gather-layers", type=int, default=1,
                   help="layers per GatheredParameters group in the DeepSpeed-HE baseline (tp_gather_partition_size)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per side (median reported), after one warm-up")
    p.add_argument("--out", default=None, help="JSON path (default results/reshard-<model>-w<world>-tp<tp>-<dtype>.json)")
    args = p.parse_args(argv)
    parse_dtype(p, args)
    check_tp(p, args.world, [args.tp])
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env, results = run_benchmark(worker, args)
    rows = [row for result in results for row in result["rows"]]
    summary = summarize(results)
    print(f"{args.model} {args.dtype} world {args.world} tp {args.tp}: inference weights "
          f"{results[0]['inference_weight_bytes'] / 2**20:.1f} MiB per rank, ours in {results[0]['buckets']} buckets "
          f"of <= {args.bucket_mb} MiB; per rank (MiB, seconds):")
    print_table(mib_columns(rows), ["side", "rank", "seconds", "bytes_received", "computed_peak_bytes",
                                    "measured_peak_bytes", "retained_bytes"])
    print("worst rank per side, and each side over ours (time, bytes received, computed peak memory):")
    print_table(mib_columns(list(summary.values())), ["side", "seconds", "bytes_received", "computed_peak_bytes",
                                                      "time_vs_ours", "bytes_vs_ours", "computed_peak_vs_ours"])
    layers = results[0]["decoder_layers"]
    print(f"decoder layers only, rank 0: ours receives {layers['ours_bytes_received'] / 2**20:.1f} MiB, a full gather "
          f"{layers['gather_bytes_received'] / 2**20:.1f} MiB "
          f"({layers['ours_bytes_received'] / max(layers['gather_bytes_received'], 1):.3f} of it)")
    mismatched = {f"{row['side']} rank {row['rank']}": row["mismatched"] for row in rows if row.get("mismatched")}
    write_json(args.out or f"results/reshard-{args.model}-w{args.world}-tp{args.tp}-{args.dtype}.json",
               {"args": vars(args), "environment": env, "rows": rows, "summary": summary,
                "inference_weight_bytes": [r["inference_weight_bytes"] for r in results],
                "decoder_layers": [r["decoder_layers"] for r in results], "identical": not mismatched})
    if mismatched:
        raise SystemExit(f"FAILED: inference weights differ from ours: {mismatched}")
    print("all three sides produced identical inference weights on every rank")


if __name__ == "__main__":
    main()
