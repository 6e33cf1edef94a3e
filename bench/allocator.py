"""Paged KV-cache block allocator: the compiled BlockAllocator against the pure-Python model.

    python -m bench.allocator [--out results/allocator.json]

Before timing, both run the same allocate / fork / append / free sequence and must return the
same slots, copy-on-write copies, block tables and free counts (the run fails otherwise).
"""
import argparse

from bench.common import median_seconds, print_environment, print_table, write_json
from hybrid_engine import BlockAllocator
from hybrid_engine.py_block_allocator import PyBlockAllocator

IMPLEMENTATIONS = {"python": PyBlockAllocator, "c++": BlockAllocator}


def batched_append_seconds(cls, num_seqs: int, prompt_len: int, block_size: int, steps: int) -> float:
    """Median seconds of one append over num_seqs sequences, across steps decode steps."""
    allocator = cls(num_seqs * (prompt_len + steps) // block_size + num_seqs, block_size)
    seq_ids = list(range(num_seqs))
    for seq_id in seq_ids:
        allocator.allocate(seq_id, prompt_len)
    return median_seconds(lambda: allocator.append(seq_ids), repeat=steps, warmup=0)


def cycle_seconds(cls, num_seqs: int, prompt_len: int, block_size: int, steps: int, repeat: int) -> float:
    """Median seconds of a whole generate call's bookkeeping: allocate, append x steps, free."""
    allocator = cls(num_seqs * (prompt_len + steps) // block_size + num_seqs, block_size)
    seq_ids = list(range(num_seqs))

    def cycle():
        for seq_id in seq_ids:
            allocator.allocate(seq_id, prompt_len)
        for _ in range(steps):
            allocator.append(seq_ids)
        for seq_id in seq_ids:
            allocator.free(seq_id)

    return median_seconds(cycle, repeat=repeat)


def bookkeeping_trace(cls, num_seqs: int, prompt_len: int, block_size: int, steps: int) -> list:
    """Everything one allocator returns over allocate, fork (copy-on-write), append x steps, free:
    the two implementations must agree for the timings to compare like with like."""
    allocator = cls(2 * num_seqs * (prompt_len + steps) // block_size + 2 * num_seqs, block_size)
    seq_ids = list(range(num_seqs)) + list(range(num_seqs, 2 * num_seqs))
    for seq_id in range(num_seqs):
        allocator.allocate(seq_id, prompt_len + seq_id % block_size)
        allocator.fork(seq_id, num_seqs + seq_id)
    trace = []
    for _ in range(steps):
        slots, copies = allocator.append(seq_ids)
        trace.append((list(map(int, slots)), [tuple(map(int, c)) for c in copies]))
    trace.append(allocator.block_table(seq_ids).tolist())
    for seq_id in seq_ids[::2]:
        allocator.free(seq_id)
    return trace + [allocator.num_free_blocks]


def run(args: argparse.Namespace) -> list[dict]:
    cases = [(f"append x{n} seqs", lambda cls, n=n: batched_append_seconds(cls, n, args.prompt_len, args.block_size, args.steps))
             for n in (256, 1024)]
    cases.append(("allocate+append x256+free, 256 seqs",
                  lambda cls: cycle_seconds(cls, 256, args.prompt_len, args.block_size, 256, args.repeat)))
    rows = []
    for name, measure in cases:
        times = {impl: measure(cls) for impl, cls in IMPLEMENTATIONS.items()}
        rows.append({"case": name, "python_us": times["python"] * 1e6, "c++_us": times["c++"] * 1e6,
                     "speedup": times["python"] / times["c++"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=256, help="tokens allocated per sequence before decoding")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    parser.add_argument("--steps", type=int, default=200, help="append calls timed per batched-append case")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions of the full cycle")
    parser.add_argument("--out", default="results/allocator.json", help="where to write the JSON results")
    args = parser.parse_args()
    env = print_environment()
    traces = [bookkeeping_trace(cls, 37, args.prompt_len, args.block_size, 2 * args.block_size + 3)
              for cls in IMPLEMENTATIONS.values()]
    identical = traces[0] == traces[1]
    rows = run(args)
    print_table(rows, ["case", "python_us", "c++_us", "speedup"])
    print(f"both implementations return identical slots, copies, block tables and free counts: {identical}")
    write_json(args.out, {"benchmark": "allocator", "environment": env, "args": vars(args), "identical": identical,
                          "results": rows})
    if not identical:
        raise SystemExit("FAIL: the C++ and Python allocators disagree")


if __name__ == "__main__":
    main()
