"""The processes of one step that rlhf.train starts: the deepspeed launcher, its launch.py and the ranks
(and any compiler a rank runs), in a process group of their own. Whatever ends the driver (the step's end,
an error, ^C, SIGTERM) the whole group is stopped before it returns: SIGTERM, then SIGKILL to what is left.
A build lock of torch's JIT extensions (DeepSpeed builds its CPU communication op on the first launch)
that no process holds is stale, left by a killed build, and torch would wait for it forever: such locks
are removed, and named, before and after every step and whenever a step falls silent, which also gets a
progress line saying what is running."""
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_GRACE_S = 10  # between SIGTERM and SIGKILL to what is left of the group
QUIET_S = 60       # a step silent this long gets a progress line
LOCK_RECHECK_S = 1  # torch releases a lock by closing it, then removing it: unheld twice, this apart, is stale


class Terminated(Exception):
    """The driver got SIGTERM (see raise_on_sigterm)."""


def raise_on_sigterm() -> None:
    """SIGTERM unwinds the driver as ^C does, so that every `finally` (stopping the step's group) runs."""
    def handler(signum, frame):
        raise Terminated(f"got {signal.Signals(signum).name}")
    signal.signal(signal.SIGTERM, handler)


def _proc_entries() -> list[str]:
    return [entry for entry in os.listdir("/proc") if entry.isdigit()]


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group, from /proc."""
    members = []
    for pid in _proc_entries():
        try:
            state, _, pgrp = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:3]
        except OSError:  # gone meanwhile
            continue
        if state != "Z" and int(pgrp) == pgid:
            members.append(int(pid))
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_until_empty(proc: subprocess.Popen, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None or group_members(proc.pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the launcher's whole group, SIGKILL to what is left after grace_s. SIGINT and SIGTERM
    wait meanwhile, so that a second ^C cannot cut the stopping short."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        if group_members(proc.pid):
            _signal_group(proc.pid, signal.SIGTERM)
        if not _wait_until_empty(proc, grace_s):
            _signal_group(proc.pid, signal.SIGKILL)
            _wait_until_empty(proc, grace_s)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def build_locks(extensions_dir: str) -> list[Path]:
    """torch.utils.cpp_extension's lock files: one per extension being built, EXTENSIONS_DIR/NAME/lock."""
    return sorted(Path(extensions_dir).glob("*/lock")) if extensions_dir else []


def lock_holders(lock: Path) -> list[int]:
    """The processes with the lock file open: torch's FileBaton keeps open the descriptor it created the
    file with until it removes it."""
    target, holders = os.path.realpath(lock), []
    for pid in _proc_entries():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == target for fd in fds):
                holders.append(int(pid))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return holders


def remove_stale_locks(extensions_dir: str) -> list[Path]:
    """Remove the build locks no process holds; the paths removed."""
    stale = [lock for lock in build_locks(extensions_dir) if not lock_holders(lock)]
    if stale:
        time.sleep(LOCK_RECHECK_S)
    removed = [lock for lock in stale if lock.exists() and not lock_holders(lock)]
    for lock in removed:
        lock.unlink(missing_ok=True)
    return removed


def say_stale_locks(label: str, extensions_dir: str) -> None:
    for lock in remove_stale_locks(extensions_dir):
        print(f"{label} removed the stale build lock {lock}: no process holds it (a build was killed "
              f"mid-way); torch would have waited for it forever", flush=True)


def command_of(pid: int) -> str:
    try:
        return shlex.join(Path(f"/proc/{pid}/cmdline").read_text().rstrip("\0").split("\0"))[:120]
    except OSError:
        return "?"


def progress(label: str, proc: subprocess.Popen, extensions_dir: str, silent_s: float) -> str:
    """What a silent step is doing: an extension build (and who builds it), or its live processes."""
    say_stale_locks(label, extensions_dir)
    builds = [f"building {lock.parent.name} in {lock.parent} (pid {pid}: {command_of(pid)})"
              for lock in build_locks(extensions_dir) for pid in lock_holders(lock)]
    running = builds or [f"{len(group_members(proc.pid))} processes running in group {proc.pid}"]
    return f"{label} no output for {silent_s:.0f} s; " + "; ".join(running)


def copy_output(proc: subprocess.Popen, log, verbose: bool, on_silence) -> None:
    """The group's output into the log (and to stdout when verbose) until it closes; on_silence(seconds)
    after every QUIET_S without output."""
    fd, silent_since = proc.stdout.fileno(), time.monotonic()
    while True:
        if not select.select([fd], [], [], QUIET_S)[0]:
            on_silence(time.monotonic() - silent_since)
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return
        silent_since = time.monotonic()
        log.write(chunk)
        log.flush()
        if verbose:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()


def run_group(cmd: list[str], env: dict[str, str], log_path: str, verbose: bool, label: str) -> int:
    """Run cmd in a process group of its own, its output appended to log_path; its return code. Stale
    build locks go before and after; the group is stopped whatever ends this call."""
    extensions_dir = env.get("TORCH_EXTENSIONS_DIR", "")
    say_stale_locks(label, extensions_dir)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        print(f"{label} launcher pid {proc.pid}, process group {proc.pid} (`kill -- -{proc.pid}` stops the step "
              f"if this command is killed with SIGKILL)", flush=True)
        try:
            copy_output(proc, log, verbose,
                        lambda silent_s: print(progress(label, proc, extensions_dir, silent_s), flush=True))
            _wait_until_empty(proc, STOP_GRACE_S)  # its output closed: the group is ending on its own
        finally:
            stop_group(proc)
            proc.stdout.close()
            say_stale_locks(label, extensions_dir)
    return proc.returncode
