import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from hybrid_engine import BlockAllocator, OutOfBlocksError
from hybrid_engine.py_block_allocator import PyBlockAllocator


def slot_of(table: torch.Tensor, token: int, block_size: int) -> int:
    return int(table[token // block_size]) * block_size + token % block_size


def state(a: BlockAllocator, seq_ids: list[int]) -> tuple:
    return a.num_free_blocks, a.block_table(seq_ids).tolist(), [a.num_tokens(s) for s in seq_ids]


def test_properties_are_read_only():
    a = BlockAllocator(7, 3)
    assert (a.num_blocks, a.block_size, a.num_free_blocks) == (7, 3, 7)
    with pytest.raises(AttributeError):
        a.num_free_blocks = 1


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (-1, 4), (4, 0), (4, -2), (2**31, 4)])
def test_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match="num_blocks|block_size"):
        BlockAllocator(num_blocks, block_size)


@pytest.mark.parametrize("num_tokens, blocks", [(0, 0), (1, 1), (4, 1), (5, 2), (12, 3)])
def test_allocate_reserves_ceil_blocks(num_tokens, blocks):
    a = BlockAllocator(5, 4)
    a.allocate(3, num_tokens)
    assert a.num_tokens(3) == num_tokens
    assert a.num_free_blocks == 5 - blocks
    assert a.block_table([3]).shape == (1, blocks)


def test_append_slots_follow_block_table():
    a = BlockAllocator(16, 4)
    a.allocate(10, 6)
    a.allocate(20, 4)
    for step in range(9):
        slots, copies = a.append([10, 20])
        assert slots.dtype == torch.int64 and copies.shape == (0, 2)
        table = a.block_table([10, 20])
        assert slots.tolist() == [slot_of(table[0], 6 + step, 4), slot_of(table[1], 4 + step, 4)]
    assert a.num_tokens(10) == 15 and a.num_tokens(20) == 13


def test_block_table_pads_with_minus_one():
    a = BlockAllocator(8, 2)
    a.allocate(1, 5)
    a.allocate(2, 1)
    table = a.block_table([2, 1])
    assert table.dtype == torch.int32 and table.shape == (2, 3)
    assert table[0, 1:].tolist() == [-1, -1] and (table[1] >= 0).all()


def test_fork_shares_blocks_and_copies_shared_last_block_on_write():
    a = BlockAllocator(8, 4)
    a.allocate(1, 6)
    parent_blocks = a.block_table([1])[0].tolist()
    a.fork(1, 2)
    assert a.num_free_blocks == 6
    assert a.block_table([2])[0].tolist() == parent_blocks
    assert [a.ref_count(b) for b in parent_blocks] == [2, 2]
    slots, copies = a.append([2])
    new_last = a.block_table([2])[0, 1].item()
    assert copies.tolist() == [[parent_blocks[1], new_last]]
    assert slots.tolist() == [new_last * 4 + 2]
    assert a.ref_count(parent_blocks[1]) == 1 and a.ref_count(parent_blocks[0]) == 2
    slots, copies = a.append([1])
    assert copies.shape == (0, 2) and slots.tolist() == [parent_blocks[1] * 4 + 2]


def test_fork_on_block_boundary_needs_no_copy():
    a = BlockAllocator(8, 4)
    a.allocate(1, 8)
    a.fork(1, 2)
    _, copies = a.append([1, 2])
    assert copies.shape == (0, 2)
    assert a.num_free_blocks == 4


def test_free_returns_shared_blocks_when_last_holder_leaves():
    a = BlockAllocator(6, 4)
    a.allocate(1, 7)
    a.fork(1, 2)
    a.free(1)
    assert a.num_free_blocks == 4
    a.free(2)
    assert a.num_free_blocks == 6


def test_freed_blocks_are_reused_at_once():
    a = BlockAllocator(4, 4)
    a.allocate(1, 4)
    freed = a.block_table([1])[0].tolist()
    a.free(1)
    a.allocate(2, 4)
    assert a.block_table([2])[0].tolist() == freed


def test_out_of_blocks_changes_nothing():
    a = BlockAllocator(4, 2)
    a.allocate(1, 3)
    a.allocate(2, 2)
    a.allocate(3, 0)
    before = state(a, [1, 2, 3])
    with pytest.raises(OutOfBlocksError, match=r"append\(3 sequences\) needs 2 blocks but only 1 of 4 are free"):
        a.append([1, 2, 3])
    with pytest.raises(OutOfBlocksError, match=r"allocate\(sequence 4, 5 tokens\) needs 3 blocks"):
        a.allocate(4, 5)
    assert issubclass(OutOfBlocksError, RuntimeError)
    assert state(a, [1, 2, 3]) == before
    with pytest.raises(KeyError):
        a.num_tokens(4)


def test_bad_sequence_ids_raise_and_change_nothing():
    a = BlockAllocator(8, 2)
    a.allocate(1, 3)
    before = state(a, [1])
    for call in (lambda: a.free(7), lambda: a.num_tokens(7), lambda: a.block_table([1, 7]),
                 lambda: a.append([1, 7]), lambda: a.fork(7, 8)):
        with pytest.raises(KeyError, match="unknown sequence 7"):
            call()
    with pytest.raises(ValueError, match="listed more than once"):
        a.append([1, 1])
    with pytest.raises(ValueError, match="already allocated"):
        a.allocate(1, 2)
    with pytest.raises(ValueError, match="already exists"):
        a.fork(1, 1)
    with pytest.raises(ValueError, match="num_tokens must be >= 0"):
        a.allocate(2, -1)
    with pytest.raises(TypeError):
        a.append("x")
    assert state(a, [1]) == before


class AllocatorMachine(RuleBasedStateMachine):
    """Random operations on the C++ allocator and the Python model, which must agree exactly."""

    def __init__(self):
        super().__init__()
        self.real = BlockAllocator(12, 3)
        self.model = PyBlockAllocator(12, 3)
        self.family: dict[int, int] = {}
        self.next_id = 0

    def both(self, method: str, *args):
        outcomes = []
        for a in (self.real, self.model):
            try:
                outcomes.append(("ok", getattr(a, method)(*args)))
            except (KeyError, ValueError, OutOfBlocksError) as e:
                outcomes.append((type(e), None))
        (real_kind, real_out), (model_kind, model_out) = outcomes
        assert real_kind == model_kind, (method, args, outcomes)
        if isinstance(real_out, tuple):
            assert all(torch.equal(r, m) for r, m in zip(real_out, model_out))
        self.last_out = real_out
        return real_kind == "ok"

    def live(self) -> list[int]:
        return sorted(self.family)

    @rule(num_tokens=st.integers(0, 14))
    def allocate(self, num_tokens):
        before = state(self.real, self.live())
        if self.both("allocate", self.next_id, num_tokens):
            self.family[self.next_id] = self.next_id
        else:
            assert state(self.real, self.live()) == before
        self.next_id += 1

    @precondition(lambda self: self.family)
    @rule(data=st.data())
    def append(self, data):
        ids = data.draw(st.lists(st.sampled_from(self.live()), unique=True, min_size=1))
        before = state(self.real, self.live())
        lengths = [self.real.num_tokens(s) for s in ids]
        if not self.both("append", ids):
            assert state(self.real, self.live()) == before
            return
        slots = self.last_out[0].tolist()
        assert slots == [slot_of(self.real.block_table([s])[0], n, 3) for s, n in zip(ids, lengths)]

    @precondition(lambda self: self.family)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self.live()))
        assert self.both("fork", parent, self.next_id)
        self.family[self.next_id] = self.family[parent]
        self.next_id += 1

    @precondition(lambda self: self.family)
    @rule(data=st.data())
    def free(self, data):
        seq_id = data.draw(st.sampled_from(self.live()))
        assert self.both("free", seq_id)
        del self.family[seq_id]

    @rule(seq_id=st.integers(-3, 3))
    def misuse(self, seq_id):
        before = state(self.real, self.live())
        if seq_id not in self.family:
            self.both("free", seq_id)
            self.both("append", [seq_id])
        self.both("allocate", self.live()[0] if self.family else seq_id, -1)
        assert state(self.real, self.live()) == before

    @invariant()
    def agrees_with_model(self):
        ids = self.live()
        assert torch.equal(self.real.block_table(ids), self.model.block_table(ids))
        assert [self.real.num_tokens(s) for s in ids] == [self.model.num_tokens(s) for s in ids]

    @invariant()
    def blocks_are_conserved_and_counted(self):
        holders: dict[int, list[int]] = {}
        for seq_id in self.live():
            for block in self.real.block_table([seq_id])[0].tolist():
                if block >= 0:
                    holders.setdefault(block, []).append(seq_id)
        assert self.real.num_free_blocks + len(holders) == self.real.num_blocks
        for block in range(self.real.num_blocks):
            assert self.real.ref_count(block) == len(holders.get(block, []))
        for block, seqs in holders.items():
            assert len({self.family[s] for s in seqs}) == 1, f"block {block} shared outside a fork: {seqs}"

    def teardown(self):
        for seq_id in self.live():
            self.real.free(seq_id)
        assert self.real.num_free_blocks == self.real.num_blocks


AllocatorMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_allocator_matches_model = AllocatorMachine.TestCase


def test_seq_ids_as_list_tuple_range_or_int64_tensor():
    results = []
    for ids in ([4, 9], (4, 9), range(4, 10, 5), torch.tensor([4, 9])):
        a = BlockAllocator(8, 2)
        a.allocate(4, 3)
        a.allocate(9, 2)
        results.append([t.tolist() for t in a.append(ids)] + [a.block_table(ids).tolist()])
    assert all(r == results[0] for r in results)


@pytest.mark.parametrize("ids", ["ab", 5, {1: 2}, [1.5], torch.tensor([1.0]), torch.tensor([[1]])])
def test_seq_ids_of_wrong_type(ids):
    a = BlockAllocator(8, 2)
    a.allocate(1, 1)
    with pytest.raises((TypeError, RuntimeError), match="seq_ids|integer"):
        a.append(ids)
    assert a.num_tokens(1) == 1
