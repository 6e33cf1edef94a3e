"""rlhf.train: the example's steps 1-2 (tiny model, few records) through the deepspeed launcher on 2
ranks, skipped when finished; a failing step reports its log; step 3 refuses missing or broken inputs;
the step-3 report (reward curve, plots, SFT vs PPO answers) from a log in rlhf.ppo's format; and step 3
of the example end to end."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

from hybrid_engine.capability import choose_dtype
from rlhf import example, report, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = ["--example", "--example-size", "tiny", "--example-records", "400"]


def run_driver(out: str, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlhf.train", *EXAMPLE, "--output-dir", out, *flags]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})


def evals(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "eval"]


@pytest.fixture(scope="module")
def steps12(tmp_path_factory) -> str:
    """The example's output dir after steps 1-2 (their run checked by the first test)."""
    out = str(tmp_path_factory.mktemp("train") / "out")
    proc = run_driver(out, "--step", "1", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(os.path.join(out, "driver.out"), "w") as f:
        f.write(proc.stdout)
    return out


def test_steps_1_2_through_the_launcher_on_2_ranks(steps12):
    stdout = open(os.path.join(steps12, "driver.out")).read()
    for n, module, folder in ((1, "rlhf.sft", "actor-models"), (2, "rlhf.reward", "reward-models")):
        output = os.path.join(steps12, folder, "opt-tiny")
        assert f"--num_gpus 2 --module {module}" in stdout and f"[step {n}] started" in stdout
        assert f"[step {n}] finished in" in stdout
        assert os.path.isfile(os.path.join(output, "config.json"))
        log = open(os.path.join(output, "training.log")).read()
        assert "dist_world_size=2" in log  # the launcher started 2 ranks
        assert evals(output)[0]["step"] == 0 and evals(output)[-1]["step"] > 0  # before and after training
    assert "total:" in stdout and "steps run: 1 2" in stdout
    ports = re.findall(r"--master_port (\d+)", stdout)
    assert len(ports) == 2 and not [f for port in ports for f in glob.glob(f"/dev/shm/*_{port}_*")]
    rm_config = json.load(open(os.path.join(steps12, "reward-models", "opt-tiny", "config.json")))
    assert rm_config["architectures"] == ["OPTForSequenceClassification"]
    sft_evals = evals(os.path.join(steps12, "actor-models", "opt-tiny"))
    assert sft_evals[-1]["perplexity"] < sft_evals[0]["perplexity"]


def test_finished_steps_are_skipped(steps12, capsys):
    config = os.path.join(steps12, "actor-models", "opt-tiny", "config.json")
    mtime = os.path.getmtime(config)
    train.main([*EXAMPLE, "--output-dir", steps12, "--step", "1", "2"])
    out = capsys.readouterr().out
    assert out.count("skipped: finished output exists") == 2 and "steps run: none" in out
    assert os.path.getmtime(config) == mtime


def test_failing_step_reports_its_log(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main([*EXAMPLE, "--output-dir", str(tmp_path), "--step", "1", "--deployment-type", "single_gpu",
                    "--step1-args", "--no_such_flag 3", "--verbose"])
    message = str(exit.value.code)
    log = tmp_path / "actor-models" / "opt-tiny" / "training.log"
    assert "step 1 (rlhf.sft) exited with return code 2" in message and str(log) in message
    assert "unrecognized arguments: --no_such_flag 3" in message  # the end of the log is shown
    assert "hint: a flag rlhf.sft does not accept" in message
    assert "unrecognized arguments" in log.read_text()
    out = capsys.readouterr().out
    assert "--num_gpus 1 --module rlhf.sft" in out and "sft.py: error: unrecognized arguments" in out  # --verbose
    assert not (tmp_path / "actor-models" / "opt-tiny" / "config.json").exists()


def write_checkpoint(path) -> None:
    example.write_model(str(path), size="tiny", seed=0)


def step3_error(tmp_path) -> str:
    with pytest.raises(SystemExit) as exit:
        train.main(["--step", "3", "--actor-model", "org/actor-x", "--reward-model", str(tmp_path / "rm-y"),
                    "--output-dir", str(tmp_path), "--data-path", str(tmp_path / "data")])
    return str(exit.value.code)


def test_step3_refuses_missing_or_broken_inputs(tmp_path):
    message = step3_error(tmp_path)
    assert f"step-1 checkpoint {tmp_path / 'actor-models' / 'actor-x'}, which does not exist" in message
    assert "run step 1 first" in message
    write_checkpoint(tmp_path / "actor-models" / "actor-x")
    message = step3_error(tmp_path)
    assert f"step-2 checkpoint {tmp_path / 'reward-models' / 'rm-y'}, which does not exist" in message
    (tmp_path / "reward-models" / "rm-y").mkdir(parents=True)
    (tmp_path / "reward-models" / "rm-y" / "config.json").write_text("{not json")
    message = step3_error(tmp_path)
    assert "which does not load" in message and "run step 2 again with --force" in message
    assert not (tmp_path / "step3-models").exists()  # nothing launched


def test_example_reward_model_starts_from_the_sft_actor(tmp_path):
    with pytest.raises(SystemExit) as exit:
        train.main([*EXAMPLE, "--output-dir", str(tmp_path), "--step", "2"])
    assert f"step 2 needs the step-1 checkpoint {tmp_path / 'actor-models' / 'opt-tiny'}" in str(exit.value.code)


def test_steps_rerun_when_their_inputs_were_rebuilt(tmp_path):
    args = train.parse_args(["--actor-model", "a/opt-x", "--reward-model", "b/opt-y", "--output-dir", str(tmp_path)])
    steps = train.steps_of(args)
    for step in steps.values():
        os.makedirs(step.checkpoint)
        open(os.path.join(step.checkpoint, "config.json"), "w").close()
    assert all(train.skip_reason(args, steps, n, rebuilt=set()) for n in (1, 2, 3))
    assert train.skip_reason(args, steps, 2, rebuilt={1}) and not train.skip_reason(args, steps, 3, rebuilt={1})
    args.force = True
    assert not any(train.skip_reason(args, steps, n, rebuilt=set()) for n in (1, 2, 3))


def test_every_step_gets_the_dtype_chosen_once(tmp_path, capsys):
    """--dtype auto is resolved (and printed) by the driver; each step gets the result, which
    --stepN-args can still override because it comes last."""
    args = train.parse_args(["--actor-model", "a/opt-x", "--reward-model", "b/opt-y", "--output-dir", str(tmp_path),
                             "--step3-args", "--dtype fp32"])
    auto = choose_dtype("auto")
    assert args.dtype == auto.name and capsys.readouterr().err.strip() == auto.message
    steps = train.steps_of(args)
    for n in (1, 2, 3):
        flags = train.step_flags(args, steps, n)
        assert flags[flags.index("--dtype") + 1] == auto.name
    assert train.step_flags(args, steps, 3)[-2:] == ["--dtype", "fp32"]


def test_launcher_flags(monkeypatch):
    monkeypatch.setattr(train, "prepare_example", lambda args: None)
    single = train.parse_args(["--output-dir", "/o"])
    assert train.launcher(single, 123)[1:] == ["--master_port", "123", "--num_gpus", "1"]
    multi = train.parse_args(["--deployment-type", "multi_node", "--hostfile", "/h", "--num-nodes", "2",
                              "--num-gpus", "8"])
    assert train.launcher(multi, 5)[1:] == ["--master_port", "5", "--num_gpus", "8", "--hostfile", "/h",
                                             "--num_nodes", "2"]
    assert "--num_gpus" not in train.launcher(train.parse_args(["--deployment-type", "single_node"]), 5)
    example_args = train.parse_args(["--example"])
    assert example_args.num_gpus == 2  # the example's 2 ranks
    for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR"):
        monkeypatch.delenv(name, raising=False)
    env = train.step_env(example_args)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and env["OMP_NUM_THREADS"] == str(max(1, os.cpu_count() // 2))
    here = env["TORCH_EXTENSIONS_DIR"]
    monkeypatch.setattr(sys, "prefix", "/another/environment")
    assert train.extensions_dir() != here and os.path.dirname(train.extensions_dir()) == os.path.dirname(here)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert train.step_env(example_args)["OMP_NUM_THREADS"] == "3"  # the user's setting wins
    for bad in (["--num-gpus", "2"], ["--hostfile", "/h"], ["--example", "--actor-model", "x"]):
        with pytest.raises(SystemExit):
            train.parse_args(bad)


def test_a_failure_says_what_failed_from_the_ranks_own_error():
    log = ("old run\nrank 0: error: from an earlier run\n=== 2026-12-05 10:00:00 deepspeed ...\nTraceback ...\n"
           "rank 1: error: ValueError: --max_seq_len 600 exceeds the model's max_position_embeddings 512\n"
           "rank 0: error: ValueError: --max_seq_len 600 exceeds the model's max_position_embeddings 512\n"
           "[launch.py:259:sigkill_handler] [...] exits with return code = 1\n")
    run = train.this_run(log)
    assert train.what_failed(1, run) == "rank 1: error: ValueError: --max_seq_len 600 exceeds the model's " \
                                        "max_position_embeddings 512"  # each message once, this run's only
    assert train.failure_hint(1, 1, run) == ""  # no guess about memory when a rank said what failed
    assert train.what_failed(247, "[...] exits with return code = -9") == "a rank was killed by SIGKILL"
    assert "OOM killer" in train.failure_hint(1, 247, "...exits with return code = -9")
    assert "OOM killer" in train.failure_hint(3, -9, "")
    assert train.what_failed(1, "[...] exits with return code = -11") == "a rank was killed by SIGSEGV"
    assert "OOM killer" not in train.failure_hint(1, 1, "[...] exits with return code = -11")
    assert train.what_failed(1, "Segmentation fault") == "no rank printed an error line (the log's last lines follow)"


def write_step3_log(path) -> None:
    """An earlier run, then the run to report in rlhf.ppo's format: it crashed after step 4 and was resumed
    from its step-2 checkpoint (steps 3-4 logged twice); a phase is missing from one record."""
    records = [{"kind": "eval", "step": 0, "reward_mean": -9.0},
               {"kind": "train", "step": 1, "reward_mean": 9.0, "time_total_s": 1.0},
               {"kind": "eval", "step": 0, "reward_mean": -1.0, "task_score": 0.1}]
    for step, reward in [(1, 0.1), (2, 0.2), (3, 0.9), (4, 0.9), (3, 0.3), (4, 0.4), (5, 0.5)]:
        phases = {"time_actor_s": 0.2, "time_generation_s": 0.5, "time_experience_s": 0.1}
        if step != 3:
            phases["time_critic_s"] = 0.15
        records.append({"kind": "train", "step": step, "reward_mean": reward, **phases,
                        "time_total_s": sum(phases.values()) + 0.01})
    records.append({"kind": "eval", "step": 5, "reward_mean": 0.7, "task_score": 0.6})
    path.write_text("\n".join(map(json.dumps, records)) + "\n")


def test_report_reads_the_last_run_and_writes_plots(tmp_path):
    write_step3_log(tmp_path / "log.jsonl")
    records = report.read_log(str(tmp_path / "log.jsonl"))
    assert [(r["kind"], r["step"]) for r in records] == [("eval", 0), *(("train", s) for s in range(1, 6)),
                                                         ("eval", 5)]
    assert report.phase_keys(records) == ["time_generation_s", "time_experience_s", "time_actor_s", "time_critic_s"]
    table = report.reward_table(records)
    assert [r["reward_mean"] for r in records if r["kind"] == "train"] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert "   5  +0.5000" in table and "+9.0000" not in table and "+0.9000" not in table
    assert "eval at step 0: reward_mean -1.0000, task_score +0.1000" in table
    assert "eval at step 5: reward_mean +0.7000, task_score +0.6000" in table
    paths = report.write_plots(str(tmp_path))
    assert paths == [str(tmp_path / "reward.png"), str(tmp_path / "phase_times.png")]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "log.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "kl_ref": 0.1}) + "\n")
    assert report.write_plots(str(tmp_path)) == []  # nothing to draw: no empty plots


def test_report_compares_answers(steps12):
    prompts = train.example_prompts(os.path.join(steps12, "example", "data-400"), 6)
    base = os.path.join(steps12, "example", "opt-tiny")
    text = report.compare_answers(os.path.join(steps12, "actor-models", "opt-tiny"), base, prompts, 8, 2,
                                  example.score)
    assert text.count("prompt: Human:") == 2 and text.count("  SFT: ") == 2 and text.count("  PPO: ") == 2
    assert "mean score over 6 prompts (sampled): SFT " in text


def test_step3_of_the_example(steps12):
    proc = run_driver(steps12, "--step3-args", "--max_steps 2 --eval_prompts 8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count(choose_dtype("auto").message) == 1  # this machine's dtype, said once
    out = os.path.join(steps12, "step3-models", "opt-tiny")
    assert "[step 1] skipped" in proc.stdout and "[step 2] skipped" in proc.stdout
    assert "--module rlhf.ppo" in proc.stdout and "[step 3] finished in" in proc.stdout
    assert os.path.isfile(os.path.join(out, "actor", "config.json"))
    assert "reward curve (step 3):" in proc.stdout and "eval at step" in proc.stdout
    for name in ("reward.png", "phase_times.png"):
        assert f"plot: {os.path.join(out, name)}" in proc.stdout and os.path.isfile(os.path.join(out, name))
    assert proc.stdout.count("  SFT: ") == 4 and proc.stdout.count("  PPO: ") == 4
    again = run_driver(steps12)
    assert again.returncode == 0 and "[step 3] skipped" in again.stdout and "steps run: none" in again.stdout
