"""The C++ kernels' worker threads (csrc/cpu/thread_pool.h): work split as at::parallel_for splits it,
the same results whatever the threads and their spinning, errors brought back to the caller, a forked
child that still runs, and spinning only inside the decode steps of a generation."""
import math
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from test_models import VOCAB, hf_model

from hybrid_engine import Generator, _C, from_hf, kernels
from hybrid_engine.models.base import CausalLM

ops = torch.ops.hybrid_engine


@pytest.fixture
def threads():
    """Sets torch's intra-op thread count for a test and puts it back after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def at_parallel_for_chunks(n: int, grain: int, num_threads: int) -> list[tuple[int, int]]:
    """ATen's OpenMP rule (ATen/ParallelOpenMP.h): min(threads, ceil(n / grain)) chunks of ceil(n / chunks)."""
    if n == 0:
        return []
    chunks = min(num_threads, math.ceil(n / grain))
    size = math.ceil(n / chunks)
    return [(b, min(n, b + size)) for b in range(0, n, size)]


@pytest.mark.parametrize("num_threads", [1, 2, 3, 4])
def test_chunks_follow_at_parallel_for_and_run_on_distinct_threads(threads, num_threads):
    threads(num_threads)
    for n in (0, 1, 2, 5, 17, 100):
        for grain in (1, 3, 16, 1000):
            chunks = _C.cpu_parallel_for_chunks(n, grain)
            assert [(b, e) for b, e, _ in chunks] == at_parallel_for_chunks(n, grain, num_threads), (n, grain)
            ran_on = [t for _, _, t in chunks]
            assert sorted(ran_on) == list(range(len(chunks))), (n, grain, ran_on)  # the caller and distinct workers


def test_an_error_in_a_worker_chunk_reaches_the_caller_and_the_pool_goes_on(threads):
    threads(3)
    for fail_at in (0, 40, 99):  # the caller's chunk, then workers'
        with pytest.raises(RuntimeError, match="failed as asked"):
            _C.cpu_parallel_for_chunks(100, 1, fail_at)
        assert [(b, e) for b, e, _ in _C.cpu_parallel_for_chunks(100, 1)] == [(0, 34), (34, 68), (68, 100)]


def kernel_outputs() -> list[torch.Tensor]:
    """A decode attention (ragged, GQA 2, shuffled blocks) and, where this CPU has it, a packed linear."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 6, 64, generator=g)
    k_cache, v_cache = torch.randn(2, 20, 16, 3, 64, generator=g)
    tables = torch.randperm(20, generator=g).to(torch.int32).view(5, 4)
    lens = torch.tensor([1, 16, 17, 40, 64], dtype=torch.int32)
    out = [ops.decode_attention(q, k_cache, v_cache, tables, lens, 0.125, 0)]
    if _C.packed_linear_supported(False):
        weight, x = torch.randn(100, 70, generator=g), torch.randn(3, 70, generator=g)
        out.append(ops.packed_linear(x, ops.pack_linear_weight(weight), 100, None, False))
    return out


def test_kernels_give_the_same_bits_on_any_threads_spinning_or_not(threads):
    threads(1)
    expected = kernel_outputs()
    for num_threads, spin in ((2, 0), (2, 200), (3, 200), (4, 0)):
        threads(num_threads)
        with kernels.spinning_workers(spin):
            for actual, want in zip(kernel_outputs(), expected, strict=True):
                assert torch.equal(actual, want), (num_threads, spin)


def test_a_forked_child_runs_the_kernels_with_threads_of_its_own():
    script = textwrap.dedent("""
        import os, torch
        from hybrid_engine import _C
        torch.set_num_threads(2)
        before = _C.cpu_parallel_for_chunks(10, 1)  # the parent's worker exists from here on
        pid = os.fork()
        if pid == 0:
            os._exit(0 if _C.cpu_parallel_for_chunks(10, 1) == [(0, 5, 0), (5, 10, 1)] else 3)
        _, status = os.waitpid(pid, 0)
        print(before, os.waitstatus_to_exitcode(status))
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the hung child too, which would spin on
        process.communicate()
        pytest.fail("the forked child hung in its first parallel kernel")
    assert process.returncode == 0, stderr
    assert stdout.split()[-1] == "0", stdout  # the child split the work as its parent did


def test_a_pool_that_grows_by_many_workers_at_once_runs_every_chunk():
    # Each forked child starts with no workers and its first job makes seven of them in one go: a worker
    # must not read its mailbox from a vector the next one's creation may reallocate.
    script = textwrap.dedent("""
        import os, torch
        from hybrid_engine import _C
        torch.set_num_threads(8)
        def ran_right(chunks):  # eight chunks of four, each on a thread of its own, the first on the caller
            return [(b, e) for b, e, _ in chunks] == [(b, b + 4) for b in range(0, 32, 4)] and \
                chunks[0][2] == 0 and sorted(t for _, _, t in chunks) == list(range(8))
        codes = []
        for _ in range(20):
            pid = os.fork()
            if pid == 0:
                os._exit(0 if ran_right(_C.cpu_parallel_for_chunks(32, 1)) else 3)
            codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        print(codes)
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip() == str([0] * 20), process.stdout


def test_spinning_workers_nests_and_restores():
    assert _C.cpu_spin_microseconds() == 0  # the default: workers sleep at once
    with kernels.spinning_workers():
        assert _C.cpu_spin_microseconds() == kernels.WORKER_SPIN_MICROSECONDS
        with kernels.spinning_workers(5):
            assert _C.cpu_spin_microseconds() == 5
        assert _C.cpu_spin_microseconds() == kernels.WORKER_SPIN_MICROSECONDS
    assert _C.cpu_spin_microseconds() == 0
    with pytest.raises(RuntimeError, match="must be >= 0"):
        _C.set_cpu_spin_microseconds(-1)


def test_workers_spin_in_decode_steps_only(monkeypatch):
    model = from_hf(hf_model("opt_pre"))
    seen = []
    compute_logits = CausalLM.compute_logits
    monkeypatch.setattr(CausalLM, "compute_logits",
                        lambda self, h: seen.append(_C.cpu_spin_microseconds()) or compute_logits(self, h))
    ids = torch.randint(0, VOCAB, (3, 7))
    Generator(model).generate(ids, max_new_tokens=4, min_new_tokens=4, eos_token_id=[])
    assert seen == [0] + [kernels.WORKER_SPIN_MICROSECONDS] * 3  # the prefill, then 3 decode steps
    assert _C.cpu_spin_microseconds() == 0
