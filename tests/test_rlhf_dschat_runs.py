"""DeepSpeed-Chat's scripts run here (issue 30). e2e_rlhf.py's command line for one node (OPT-1.3B actor,
OPT-350M reward model, --deployment-type single_node), with only the models, data and output swapped for
local ones and the launcher pointed at 2 CPU ranks, runs steps 1 -> 2 -> 3 to checkpoints, each step with
the flags of DeepSpeed-Chat's script for it (rlhf.e2e_presets; tests/test_rlhf_dschat.py checks they are the
scripts' own). The models are the example's tiny OPT with 512 positions (the scripts train on 512 tokens)
in directories named opt-1.3b and opt-350m, which is what gives them those scripts' settings.

Kills: SIGTERM to rlhf.train while step 1's ranks build DeepSpeed's communication op (an empty extensions
directory), and while step 3 iterates; ^C (SIGINT) to the run after that. Each leaves no process, no lock
and nothing half-written, and each next run is training within a minute, the first one past a stale
build lock planted where it builds. The reward model step 2 wrote scores alike in DeepSpeed-Chat's loader;
a critic written by DeepSpeed-Chat's step 2 (no tokenizer) feeds our step 3."""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import dschat_reference as dschat
from bench.launch import run_ranks
from rlhf import example, train
from rlhf.e2e_presets import SCRIPT_FLAGS
from rlhf.hf_models import TOKENIZER_FILES
from rlhf.ppo_args import parse_args as ppo_parse_args
from rlhf.reward_model import token_values
from rlhf.rlhf_engine import check_models, load_critic
from rlhf.step_process import group_members
from test_rlhf_dschat import ragged_rows, scores_three_ways, step3_rows

ROOT = Path(__file__).resolve().parents[1]
RECORDS = 100  # steps 1-3 get 18, 36 and 36 training records: a few optimizer steps each, 4 PPO iterations
START_S = 60   # "the next run starts within a minute": its first log record (the eval before training)
STOP_S = 30    # from the signal to the driver's exit, its step's group stopped


def build_op(extensions_dir: str) -> None:
    """DeepSpeed's CPU communication op, built (or found built) where the steps look for it: on a fresh
    machine the first launch spends about a minute on it, which is not what these tests time."""
    code = "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=900,
                   env={**os.environ, "TORCH_EXTENSIONS_DIR": extensions_dir})


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    """Data, the two base models and an extensions directory with DeepSpeed's op built, copied from the one
    the steps use by default (mtimes kept, so usually nothing is rebuilt)."""
    root = tmp_path_factory.mktemp("dschat")
    example.write_data(str(root / "data"), RECORDS, seed=5)
    for name, seed in (("opt-1.3b", 1), ("opt-350m", 2)):
        example.write_model(str(root / name), "tiny", seed, positions=512)
    default = os.environ.get("TORCH_EXTENSIONS_DIR") or train.extensions_dir()
    build_op(default)  # on a fresh machine, the minute the first launch there would spend anyway
    shutil.copytree(default, root / "ext")
    build_op(str(root / "ext"))  # found built when the copy is up to date; else built here, before any timing
    return root


def e2e_flags(task: Path) -> list[str]:
    """e2e_rlhf.py's single-node OPT-1.3B/350M line with the swaps: local models and data, 2 CPU ranks."""
    return ["--actor-model", str(task / "opt-1.3b"), "--reward-model", str(task / "opt-350m"),
            "--deployment-type", "single_node", "--num-gpus", "2", "--data-path", str(task / "data")]


def terminal_sigint() -> None:
    """SIGINT as a terminal's foreground job has it: a suite started in the background (`cmd &` without job
    control) ignores SIGINT, which its children inherit, and Python then installs no ^C handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Driver:
    """rlhf.train in the background, its output in a file."""

    def __init__(self, task: Path, name: str, extensions_dir: Path, *extra: str):
        self.out, self.stdout_path = task / "out", task / f"{name}.out"
        self.extensions_dir, self.started = extensions_dir, time.monotonic()
        with open(self.stdout_path, "w") as stdout:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rlhf.train", *e2e_flags(task), "--output-dir", str(self.out), *extra],
                stdout=stdout, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, preexec_fn=terminal_sigint,
                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "TORCH_EXTENSIONS_DIR": str(extensions_dir)})

    @property
    def output(self) -> str:
        return self.stdout_path.read_text()

    def wait_for(self, condition, timeout_s: float, what: str) -> float:
        """Seconds since the start until condition() holds; fails with the driver's output if it never does."""
        while not condition():
            assert self.proc.poll() is None, f"driver exited ({self.proc.returncode}) before {what}:\n{self.output}"
            assert time.monotonic() - self.started < timeout_s, f"no {what} in {timeout_s} s:\n{self.output}"
            time.sleep(0.1)
        return time.monotonic() - self.started

    def stop(self, sig: signal.Signals) -> dict:
        """Send sig to the driver alone (as ^C in a terminal reaches it) and record what it left."""
        sent = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=120)
        return {"code": code, "stop_s": time.monotonic() - sent, "output": self.output,
                "processes": leftovers([str(self.out), str(self.extensions_dir)]),
                "groups": {int(g): group_members(int(g)) for g in re.findall(r"process group (\d+)", self.output)},
                "locks": glob.glob(str(self.extensions_dir / "*" / "lock")),
                "shm": [f for port in re.findall(r"--master_port (\d+)", self.output)
                        for f in glob.glob(f"/dev/shm/*_{port}_*")],
                "partial": glob.glob(str(self.out / "**" / ".tmp-*"), recursive=True)
                + glob.glob(str(self.out / "data_files" / "*.tmp"))}


def leftovers(markers: list[str]) -> list[str]:
    """Live processes (but this one) whose command line names a marker or whose directory is below one."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
            cwd = os.readlink(f"/proc/{pid}/cwd")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if int(pid) != os.getpid() and state != "Z" and any(m in cmdline or cwd.startswith(m) for m in markers):
            found.append(f"{pid} {cmdline[:200]}")
    return found


def assert_left_nothing(stopped: dict, code: int) -> None:
    assert stopped["code"] == code, stopped["output"]
    assert stopped["stop_s"] < STOP_S
    assert stopped["processes"] == [] and all(m == [] for m in stopped["groups"].values()) and stopped["groups"]
    assert stopped["locks"] == [] and stopped["shm"] == [] and stopped["partial"] == []
    assert "the running step's processes were stopped" in stopped["output"]


def log_records(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def killed_mid_build(task) -> dict:
    """SIGTERM while a rank of step 1 builds DeepSpeed's op in an empty extensions directory (lock held)."""
    fresh = task / "ext-empty"
    fresh.mkdir()
    driver = Driver(task, "killed-mid-build", fresh)
    driver.wait_for(lambda: glob.glob(str(fresh / "*" / "lock")), 300, "build lock")
    return driver.stop(signal.SIGTERM)


@pytest.fixture(scope="module")
def chain(task, killed_mid_build) -> dict:
    """The next run, steps 1 -> 2 -> 3, past a stale lock planted in the built extensions directory (what a
    run killed with SIGKILL mid-build leaves, which no cleanup of its own can remove)."""
    (task / "ext" / "deepspeed_shm_comm" / "lock").touch()
    driver = Driver(task, "chain", task / "ext")
    first_log = task / "out" / "actor-models" / "opt-1.3b" / "log.jsonl"
    training_s = driver.wait_for(lambda: log_records(first_log) > 0, 600, "step-1 log record")
    code = driver.proc.wait(timeout=900)
    return {"code": code, "output": driver.output, "training_s": training_s,
            "total_s": time.monotonic() - driver.started}


def test_sigterm_mid_build_leaves_no_process_and_no_lock(killed_mid_build):
    assert_left_nothing(killed_mid_build, 143)
    print(f"SIGTERM mid build: rlhf.train gone {killed_mid_build['stop_s']:.1f} s later, its group empty")
    assert "interrupted (got SIGTERM)" in killed_mid_build["output"]
    assert re.search(r"\[step 1\] removed the stale build lock .*/deepspeed_shm_comm/lock", killed_mid_build["output"])


def test_the_next_run_is_training_within_a_minute_past_a_stale_lock(chain, task):
    assert chain["code"] == 0, chain["output"]
    assert f"[step 1] removed the stale build lock {task / 'ext' / 'deepspeed_shm_comm' / 'lock'}" in chain["output"]
    assert chain["training_s"] < START_S
    steps = re.findall(r"finished in (\S+):", chain["output"])
    print(f"next run: first step-1 log record {chain['training_s']:.1f} s after the start; steps 1-3 {steps}, "
          f"all {chain['total_s']:.0f} s")


SCRIPTS = {1: "step1_supervised_finetuning/training_scripts/opt/single_node/run_1.3b.sh",
           2: "step2_reward_model_finetuning/training_scripts/opt/single_node/run_350m.sh",
           3: "step3_rlhf_finetuning/training_scripts/opt/single_node/run_1.3b.sh"}
CHECKPOINTS = {1: "actor-models/opt-1.3b", 2: "reward-models/opt-350m", 3: "step3-models/opt-1.3b/actor"}


@pytest.mark.parametrize("n", [1, 2, 3])
def test_each_step_ran_its_dschat_script_flags_on_2_ranks_to_a_checkpoint(chain, task, n):
    assert f"[step {n}] settings of DeepSpeed-Chat's training/{SCRIPTS[n]}" in chain["output"]
    step_dir = task / "out" / CHECKPOINTS[n].removesuffix("/actor")
    log = (step_dir / "training.log").read_text().rsplit("\n=== ", 1)[1]  # this run's part (step 1 ran twice)
    launched = log.splitlines()[0].split()
    flags = launched[launched.index("--module") + 2:]
    assert flags[:len(SCRIPT_FLAGS[SCRIPTS[n]].split())] == SCRIPT_FLAGS[SCRIPTS[n]].split()  # unchanged, first
    assert "dist_world_size=2" in log and "--num_gpus 2" in " ".join(launched)
    assert log.count("--deepspeed: accepted for DeepSpeed-Chat scripts, no effect here") == 1
    assert (task / "out" / CHECKPOINTS[n] / "config.json").is_file()
    records = [json.loads(line) for line in (step_dir / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] > 0  # trained, then evaluated


def test_the_reward_model_trained_here_scores_alike_in_dschat(chain, task):
    """Step 2's output (2 ranks, bf16 where the CPU multiplies it natively) in DeepSpeed-Chat's loader,
    in transformers and here, on random ragged rows in both of DeepSpeed-Chat's layouts."""
    rm, actor = task / "out" / "reward-models" / "opt-350m", task / "out" / "actor-models" / "opt-1.3b"
    assert (rm / "pytorch_model.bin").is_file() and (rm / "model.safetensors").is_file()
    tokenizer, gen = AutoTokenizer.from_pretrained(actor), torch.Generator().manual_seed(7)
    for ids, mask, prompt_length in (ragged_rows(tokenizer, gen), step3_rows(tokenizer, gen)):
        theirs, hf, ours = scores_three_ways(str(rm), str(actor), ids, mask, prompt_length)
        print(f"max |DeepSpeed-Chat - transformers| {(theirs - hf).abs().max():.2e}, "
              f"|ours - transformers| {(ours - hf).abs().max():.2e} over {len(ids)} rows")
        torch.testing.assert_close(theirs, hf, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-6)


# Step 3 of the chain runs 5 PPO iterations in a few seconds: 40 epochs of them keep it iterating when each
# signal lands, however loaded the machine.
LONG_STEP_3 = ("--step", "3", "--force", "--step3-args", "--num_train_epochs 40")


def test_sigterm_mid_step_3_then_ctrl_c_on_the_next_run(chain, task):
    log = task / "out" / "step3-models" / "opt-1.3b" / "log.jsonl"
    before = log_records(log)
    iterating = Driver(task, "killed-mid-step-3", task / "ext", *LONG_STEP_3)
    iterating.wait_for(lambda: log_records(log) > before + 1, 300, "a PPO iteration")  # the eval, then a train
    stopped = iterating.stop(signal.SIGTERM)
    assert_left_nothing(stopped, 143)
    before = log_records(log)
    following = Driver(task, "ctrl-c-step-3", task / "ext", *LONG_STEP_3)
    started_s = following.wait_for(lambda: log_records(log) > before, 300, "step-3 log record")
    assert started_s < START_S
    assert_left_nothing(following.stop(signal.SIGINT), 130)
    print(f"step 3: stopped {stopped['stop_s']:.1f} s after SIGTERM; the next run's first record after "
          f"{started_s:.1f} s")


def dschat_critic_worker(rank: int, world: int, argv: list[str]) -> list[dict]:
    from rlhf import ppo
    ppo.main(argv)
    with open(os.path.join(argv[argv.index("--output_dir") + 1], "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_critic_written_by_dschat_feeds_our_step_3(task, tmp_path, capsys):
    """DeepSpeed-Chat's step 2 output (its save_hf_format: pytorch_model.bin and config.json; under
    transformers 5 no tokenizer file) as --critic_model_name_or_path: the actor's tokenizer reads it, its
    values are DeepSpeed-Chat's own, and two PPO iterations train and save it."""
    actor, critic_dir = task / "opt-1.3b", tmp_path / "dschat-critic"
    tokenizer = dschat.load_hf_tokenizer(str(task / "opt-350m"))
    torch.manual_seed(11)
    theirs = dschat.RewardModel(dschat.create_hf_model(AutoModel, str(task / "opt-350m"), tokenizer), tokenizer, 1)
    dschat.save_hf_format(theirs, tokenizer, str(critic_dir))
    assert not any((critic_dir / name).exists() for name in TOKENIZER_FILES)
    actor_tokenizer = AutoTokenizer.from_pretrained(actor)
    ids, mask, _ = ragged_rows(actor_tokenizer, torch.Generator().manual_seed(3))
    ours = load_critic(str(critic_dir), actor_tokenizer.pad_token_id).eval()
    with torch.no_grad():
        torch.testing.assert_close(token_values(ours, ids, mask) * mask,
                                   theirs.eval().forward_value(ids, mask, return_value_only=True) * mask)
    argv = ["--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", str(critic_dir),
            "--data_path", str(task / "data"), "--output_dir", str(tmp_path / "ppo"), "--max_steps", "2",
            "--max_prompt_seq_len", "64", "--max_answer_seq_len", "16", "--per_device_generation_batch_size", "4",
            "--per_device_training_batch_size", "4", "--eval_prompts", "4", "--dtype", "fp32",
            "--data_output_path", str(tmp_path / "data_files")]
    check_models(ppo_parse_args(argv), actor_tokenizer)
    assert "has no tokenizer files, as DeepSpeed-Chat's step 2 saves it" in capsys.readouterr().out
    records = run_ranks(1, dschat_critic_worker, argv)[0]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert (tmp_path / "ppo" / "critic" / "config.json").is_file()


def test_a_dschat_critic_whose_vocabulary_differs_is_refused(task, tmp_path):
    critic_dir = tmp_path / "other-vocab"
    tokenizer = dschat.load_hf_tokenizer(str(task / "opt-350m"))
    dschat.save_hf_format(dschat.RewardModel(dschat.create_hf_model(AutoModel, str(task / "opt-350m"), tokenizer),
                                             tokenizer), tokenizer, str(critic_dir))
    vocab = tokenizer.get_vocab()
    vocab["zebra"], vocab["cat"] = vocab["cat"], len(vocab)  # a word swapped for another
    (critic_dir / "vocab.json").write_text(json.dumps(vocab))
    argv = ["--actor_model_name_or_path", str(task / "opt-1.3b"), "--critic_model_name_or_path", str(critic_dir),
            "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=r"critic's vocabulary .* differs from the actor's tokenizer .* for 2 of"):
        check_models(ppo_parse_args(argv), AutoTokenizer.from_pretrained(task / "opt-1.3b"))
