"""ReshardPlan on one process: N simulated ranks hold ZeRO-3 shards built here from full tensors
(flatten, pad to a multiple of N, rank r keeps [r*c, (r+1)*c)); the exchange all_to_all_single
would do is done by slicing buffers. Every rank must end with exactly its TP slices."""
import itertools

import pytest
import torch

from hybrid_engine._C import ReshardPlan

SPLIT_DIM = {"replicated": None, "column": 0, "row": 1}


def zero3_shards(full: torch.Tensor, world: int) -> list[torch.Tensor]:
    flat = full.flatten()
    c = -(-flat.numel() // world)
    padded = torch.cat([flat, torch.full((c * world - flat.numel(),), float("nan"), dtype=flat.dtype)])
    return [padded[r * c:(r + 1) * c].clone() for r in range(world)]


def tp_slice(full: torch.Tensor, split: str, tp_rank: int, tp: int) -> torch.Tensor:
    dim = SPLIT_DIM[split]
    return full if dim is None else full.chunk(tp, dim=dim)[tp_rank]


def needed_indices(shape: tuple[int, int], split: str, tp_rank: int, tp: int) -> torch.Tensor:
    return tp_slice(torch.arange(shape[0] * shape[1]).view(shape), split, tp_rank, tp).flatten()


def exchange(plans: list[ReshardPlan], shards: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """What all_to_all_single delivers: rank d receives, from each s in rank order, s's chunk for d."""
    world = len(plans)
    sends = []
    for plan, rank_shards in zip(plans, shards):
        counts = plan.send_counts()
        buf = torch.empty(int(counts.sum()), dtype=rank_shards[0].dtype)
        plan.pack(rank_shards, buf)
        sends.append(buf.split(counts.tolist()))
    return [torch.cat([sends[s][d] for s in range(world)]) for d in range(world)]




def run_plan(model, world: int, tp: int, src_dtype=torch.float32, dst_dtype=torch.float32):
    torch.manual_seed(world * 10 + tp)
    fulls = [torch.randn(shape).to(src_dtype) for _, shape, _ in model]
    names = list(dict.fromkeys(name for name, _, _ in model))
    sources, expected_parts = [], {}
    for rank in range(world):
        expected_parts[rank] = {n: [] for n in names}
    dst_row = dict.fromkeys(names, 0)
    for (name, (rows, cols), split), full in zip(model, fulls):
        sources.append((rows, cols, split, names.index(name), dst_row[name]))
        dst_row[name] += rows // tp if split == "column" else rows
        for rank in range(world):
            expected_parts[rank][name].append(tp_slice(full, split, rank % tp, tp).to(dst_dtype))
    plans = [ReshardPlan(sources, world, tp, r) for r in range(world)]
    shards = [[zero3_shards(f, world)[r] for f in fulls] for r in range(world)]
    received = exchange(plans, shards)
    results = []
    for rank, plan in enumerate(plans):
        expected = [torch.cat(expected_parts[rank][n]) for n in names]
        dsts = [torch.full_like(e, float("nan")) for e in expected]
        plan.copy_local(shards[rank], dsts)
        plan.unpack(received[rank], dsts)
        results.append((plan, dsts, expected))
    return sources, results


OPT_LIKE = [  # odd sizes on purpose: hidden 70, ffn 138, vocab 251, not multiples of the world size
    ("embed", (251, 70), "replicated"),
    ("qkv.weight", (70, 70), "column"), ("qkv.weight", (70, 70), "column"), ("qkv.weight", (70, 70), "column"),
    ("qkv.bias", (70, 1), "column"), ("qkv.bias", (70, 1), "column"), ("qkv.bias", (70, 1), "column"),
    ("out.weight", (70, 70), "row"), ("out.bias", (70, 1), "replicated"),
    ("fc1.weight", (138, 70), "column"), ("fc2.weight", (70, 138), "row"),
    ("norm.weight", (70, 1), "replicated"),
]


@pytest.mark.parametrize("world, tp", [(1, 1), (2, 1), (2, 2), (3, 1), (4, 2), (6, 2)])
def test_every_rank_gets_exactly_its_tp_slices(world, tp):
    _, results = run_plan(OPT_LIKE, world, tp)
    for plan, dsts, expected in results:
        for got, want in zip(dsts, expected):
            assert torch.equal(got, want)


@pytest.mark.parametrize("src_dtype, dst_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                                  (torch.bfloat16, torch.float32)])
def test_dtype_is_converted_on_unpack(src_dtype, dst_dtype):
    _, results = run_plan(OPT_LIKE, 4, 2, src_dtype, dst_dtype)
    for _, dsts, expected in results:
        assert all(g.dtype == dst_dtype and torch.equal(g, w) for g, w in zip(dsts, expected))


@pytest.mark.parametrize("world, tp", [(2, 2), (2, 1), (4, 2), (3, 1)])
def test_bytes_received_are_the_analytic_minimum(world, tp):
    sources, results = run_plan(OPT_LIKE, world, tp)
    for rank, (plan, _, _) in enumerate(results):
        minimum = 0
        for rows, cols, split, _, _ in sources:
            c = -(-rows * cols // world)
            needed = needed_indices((rows, cols), split, rank % tp, tp)
            minimum += int(((needed < rank * c) | (needed >= (rank + 1) * c)).sum())
        assert int(plan.recv_counts().sum()) == minimum
        assert plan.recv_counts()[rank] == 0 and plan.send_counts()[rank] == 0
    for s, d in itertools.product(range(world), repeat=2):
        assert results[s][0].send_counts()[d] == results[d][0].recv_counts()[s]


def test_world_2_tp_2_moves_no_column_bytes_and_a_quarter_of_row_bytes():
    hidden = 64
    model = [("qkv", (3 * hidden, hidden), "column"), ("out", (hidden, hidden), "row")]
    sources, results = run_plan(model[:1], 2, 2)
    assert all(int(plan.recv_counts().sum()) == 0 for plan, _, _ in results)
    sources, results = run_plan(model[1:], 2, 2)
    assert all(int(plan.recv_counts().sum()) == hidden * hidden // 4 for plan, _, _ in results)


@pytest.mark.parametrize("sources, world, tp, match", [
    ([(4, 5, "row", 0, 0)], 2, 2, "row-parallel but its 5 columns"),
    ([(4, 4, "row", 0, 0)], 3, 2, "must be >= 1 and divide world_size"),
    ([(4, 4, "row", 0, 0)], 2, 2, "rank 2 is outside"),
    ([(0, 4, "row", 0, 0)], 2, 2, "has shape"),
    ([(8, 4, "column", 0, 0, 2, 5)], 2, 2, r"row range \[2, 5\) is outside its slice's 4 rows"),
    ([(8, 4, "row", 0, 0, 3, 3)], 2, 2, r"row range \[3, 3\)"),
])
def test_bad_plans_raise(sources, world, tp, match):
    rank = 2 if "rank 2" in match else 0
    with pytest.raises(RuntimeError, match=match):
        ReshardPlan(sources, world, tp, rank)


@pytest.mark.parametrize("world, tp, rows", [(2, 2, 5), (4, 2, 7), (2, 2, 1), (3, 3, 7)])
def test_column_rows_not_divisible_by_tp_leave_the_padding_unwritten(world, tp, rows):
    """A vocabulary padded to a multiple of tp: every rank's slice has room for p = ceil(rows / tp)
    rows and gets source rows [j * p, (j + 1) * p) cut at `rows` (none at all for rank 1 of a
    1-row source); the rows past it keep what they held, and no rank receives more than it lacks."""
    torch.manual_seed(rows)
    full, room = torch.randn(rows, 3), -(-rows // tp)
    plans = [ReshardPlan([(rows, 3, "column", 0, 0)], world, tp, r) for r in range(world)]
    shards = [zero3_shards(full, world)[r] for r in range(world)]
    received = exchange(plans, [[shard] for shard in shards])
    for rank, plan in enumerate(plans):
        got = torch.full((room, 3), float("nan"))
        plan.copy_local([shards[rank]], [got])
        plan.unpack(received[rank], [got])
        mine = full[rank % tp * room:(rank % tp + 1) * room]
        assert torch.equal(got[:len(mine)], mine) and bool(got[len(mine):].isnan().all())
        c = shards[0].numel()
        needed = torch.arange(rank % tp * room * 3, (rank % tp * room + len(mine)) * 3)
        assert int(plan.recv_counts().sum()) == int(((needed < rank * c) | (needed >= (rank + 1) * c)).sum())


def test_row_ranges_split_one_plan_into_several():
    """Pieces of rows, as the resharder cuts tensors larger than a bucket, move the same bytes."""
    full = torch.randn(12, 6)
    for split in ("replicated", "column", "row"):
        slice_rows = 6 if split == "column" else 12
        for rank in range(2):
            whole = ReshardPlan([(12, 6, split, 0, 0)], 2, 2, rank)
            pieces = [ReshardPlan([(12, 6, split, 0, 0, b, min(b + 5, slice_rows))], 2, 2, rank)
                      for b in range(0, slice_rows, 5)]
            assert int(whole.recv_counts().sum()) == sum(int(p.recv_counts().sum()) for p in pieces)
            shard = zero3_shards(full, 2)[rank]
            got, want = torch.full((slice_rows, 6 // (2 if split == "row" else 1)), float("nan")), None
            want = got.clone()
            whole.copy_local([shard], [want])
            for p in pieces:
                p.copy_local([shard], [got])
            assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_bad_split_name_and_bad_buffers_raise():
    with pytest.raises(ValueError, match="split must be"):
        ReshardPlan([(4, 4, "rows", 0, 0)], 2, 2, 0)
    with pytest.raises(ValueError, match="got 6 fields"):
        ReshardPlan([(4, 4, "row", 0, 0, 1)], 2, 2, 0)
    plan = ReshardPlan([(4, 4, "row", 0, 0)], 2, 2, 0)
    shard = torch.randn(8)
    with pytest.raises(RuntimeError, match="expected 1 shards"):
        plan.copy_local([shard, shard], [torch.empty(4, 2)])
    with pytest.raises(RuntimeError, match="shard 0 has 3 elements"):
        plan.copy_local([torch.randn(3)], [torch.empty(4, 2)])
    with pytest.raises(RuntimeError, match="too small"):
        plan.copy_local([shard], [torch.empty(4, 1)])
    with pytest.raises(RuntimeError, match="send buffer"):
        plan.pack([shard], torch.empty(1))
    with pytest.raises(RuntimeError, match="only 0 were given"):
        plan.unpack(torch.empty(8), [])


@pytest.mark.parametrize("src_dtype, dst_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                  (torch.float16, torch.float16)])
def test_triton_plan_matches_cpp_plan(src_dtype, dst_dtype):
    """The GPU executor, run on the CPU through the Triton interpreter, against the C++ one."""
    from hybrid_engine.reshard import TritonPlan

    sources, results = run_plan(OPT_LIKE, 2, 2, src_dtype, dst_dtype)
    torch.manual_seed(3)
    fulls = [torch.randn(rows, cols).to(src_dtype) for rows, cols, _, _, _ in sources]
    shards = [[zero3_shards(f, 2)[r] for f in fulls] for r in range(2)]
    plans = [plan for plan, _, _ in results]
    received = exchange(plans, shards)
    for rank, (plan, dsts, _) in enumerate(results):
        triton_plan = TritonPlan(plan, 2, torch.device("cpu"))
        send = torch.empty(int(plan.send_counts().sum()), dtype=src_dtype)
        expected_send = torch.empty_like(send)
        triton_plan.pack(shards[rank], send)
        plan.pack(shards[rank], expected_send)
        assert torch.equal(send, expected_send)
        got = [torch.full_like(d, float("nan")) for d in dsts]
        want = [torch.full_like(d, float("nan")) for d in dsts]
        for executor, out in ((triton_plan, got), (plan, want)):
            executor.copy_local(shards[rank], out)
            executor.unpack(received[rank], out)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_pack_converts_to_the_send_buffer_dtype():
    """Packing fp32 shards into a bf16 buffer rounds exactly as converting afterwards does."""
    torch.manual_seed(4)
    fulls = [torch.randn(rows, cols) for _, (rows, cols), _ in OPT_LIKE]
    sources = [(rows, cols, split, 0, 0) for _, (rows, cols), split in OPT_LIKE]
    plan = ReshardPlan(sources, 2, 2, 0)
    shards = [zero3_shards(f, 2)[0] for f in fulls]
    wide = torch.empty(int(plan.send_counts().sum()))
    narrow = torch.empty(int(plan.send_counts().sum()), dtype=torch.bfloat16)
    plan.pack(shards, wide)
    plan.pack(shards, narrow)
    assert torch.equal(narrow, wide.to(torch.bfloat16))
