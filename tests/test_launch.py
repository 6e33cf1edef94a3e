"""bench.launch.run_ranks: ranks forked from a fork server, each launch with its caller's environment
and thread count, results in rank order, a failing rank's traceback raised in the caller."""
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from bench import launch
from bench.launch import importable, run_ranks


def env_worker(rank: int, world: int, name: str) -> dict:
    return {"rank": os.environ["RANK"], "world": os.environ["WORLD_SIZE"], "value": os.environ.get(name),
            "threads": torch.get_num_threads(), "pid": os.getpid()}


def sleeping_worker(rank: int, world: int, folder: str) -> None:
    Path(folder, f"{rank}.pid").write_text(str(os.getpid()))
    time.sleep(300)


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)
    return condition()


def failing_worker(rank: int, world: int) -> None:
    if rank == 1:
        raise ArithmeticError("rank 1 cannot divide")


def test_every_launch_sees_its_callers_environment_and_threads(monkeypatch):
    name = "HYBRID_ENGINE_TEST_LAUNCH"
    first = run_ranks(2, env_worker, name)
    monkeypatch.setenv(name, "second launch")  # set after the fork server started
    second = run_ranks(3, env_worker, name, threads=2)
    assert [(r["rank"], r["world"], r["value"], r["threads"]) for r in first] == [("0", "2", None, 1),
                                                                                  ("1", "2", None, 1)]
    assert [(r["rank"], r["world"], r["value"], r["threads"]) for r in second] == [
        (str(i), "3", "second launch", 2) for i in range(3)]
    assert len({r["pid"] for r in first + second}) == 5 and os.getpid() not in {r["pid"] for r in second}


def test_a_failing_rank_raises_its_traceback():
    with pytest.raises(RuntimeError, match="(?s)a rank failed.*ArithmeticError: rank 1 cannot divide"):
        run_ranks(2, failing_worker)


def test_functions_of_main_are_found_by_module_name(monkeypatch):
    def fn():
        pass

    fn.__module__, fn.__qualname__ = "__main__", "run_ranks"
    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="bench.launch")  # as `python -m bench.launch` sets it
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert importable(fn) is launch.run_ranks
    main.__spec__ = None  # a script run by its path
    with pytest.raises(ValueError, match="run the script with `python -m`"):
        importable(fn)
    assert importable(env_worker) is env_worker


def test_ranks_end_when_their_launcher_is_killed(tmp_path):
    code = f"from bench.launch import run_ranks; import test_launch; run_ranks(2, test_launch.sleeping_worker, {str(tmp_path)!r})"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "tests"), str(root)])}
    launcher = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=root)
    pids = [tmp_path / f"{rank}.pid" for rank in range(2)]
    try:
        assert wait_for(lambda: all(p.exists() and p.read_text() for p in pids), 120), "the ranks never started"
        ranks = [int(p.read_text()) for p in pids]
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(30)
        assert wait_for(lambda: not any(running(pid) for pid in ranks), 30), "ranks outlived their launcher"
    finally:
        launcher.kill()


def test_world_below_one_is_refused():
    with pytest.raises(ValueError, match="world must be >= 1"):
        run_ranks(0, env_worker, "X")
