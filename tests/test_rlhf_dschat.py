"""DeepSpeed-Chat's own command lines as the test (issue 30), without running a step: every flag set of
its training scripts (tests/dschat_flag_sets.json, extracted by scripts/dschat_flag_sets.py, each with
its source path) parses through our entry point with only model, data and output paths swapped, to the
script's values; every flag of its main.py parsers is known; e2e_rlhf.py's command lines become the
step commands its scripts would run; rlhf.e2e_presets is each script's flags. The reward model written
here loads in DeepSpeed-Chat's critic loader (tests/dschat_reference.py, rebuilt from its source) and in
transformers with the same scores. The process helpers of rlhf.train stop whole groups and clear stale
build locks. tests/test_rlhf_dschat_runs.py runs the steps."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, OPTConfig

import dschat_reference as dschat
from rlhf import e2e_presets, example, ppo_args, reward, sft, step_process, train
from rlhf.args import NO_EFFECT, check_args
from rlhf.data import sources
from rlhf.hf_models import save_hf
from rlhf.reward_model import load_reward_model, reward_scores

DATA = json.loads((Path(__file__).parent / "dschat_flag_sets.json").read_text())
SCRIPT_SETS = [s for s in DATA["flag_sets"] if s["step"] != "e2e"]
E2E_SETS = [s for s in DATA["flag_sets"] if s["step"] == "e2e"]
PARSERS = {"sft": sft.build_parser, "reward": reward.build_parser, "dpo": reward.build_parser,
           "ppo": ppo_args.build_parser}
CHECKS = {"sft": check_args, "reward": check_args, "dpo": check_args, "ppo": ppo_args.check_args}
LOCAL = {"{model}": "/models/base", "{actor}": "/models/actor", "{critic}": "/models/critic",
         "{data}": "/data/local", "{output}": "/runs/out"}
PATH_FLAGS = ("--model_name_or_path", "--actor_model_name_or_path", "--critic_model_name_or_path", "--data_path",
              "--output_dir", "--tensorboard_path")
DPO_ONLY = {"--beta", "--label_smoothing", "--offload_reference_model"}


def set_id(flag_set: dict) -> str:
    path = flag_set["source"].split("DeepSpeed-Chat/", 1)[1]
    return path + (f"[{' '.join(flag_set['script_args'])}]" if flag_set.get("script_args") else "") + \
        (f"[{' '.join(flag_set['flags'])}]" if flag_set["step"] == "e2e" else "")


def swapped(flags: list[str]) -> list[str]:
    return [LOCAL.get(token, token) for token in flags]


def expected_values(parser, flags: list[str]) -> dict:
    """dest -> the value argparse must give each flag of the list (the last one given wins)."""
    expected, i = {}, 0
    while i < len(flags):
        action = parser._option_string_actions[flags[i]]
        j = i + 1
        while j < len(flags) and not flags[j].startswith("--"):
            j += 1
        values = [action.type(v) if action.type else v for v in flags[i + 1:j]]
        expected[action.dest] = action.const if action.nargs == 0 else values if action.nargs in ("+", "*") \
            else values[0]
        i = j
    return expected


def without_paths(flags: list[str]) -> list[str]:
    out, skip = [], False
    for token in flags:
        skip = token in PATH_FLAGS if token.startswith("--") else skip
        out += [] if skip else [token]
    return out


@pytest.mark.parametrize("flag_set", SCRIPT_SETS, ids=set_id)
def test_every_script_flag_set_parses_to_its_values(flag_set, capsys):
    """Each flag set through its step's parser and checks; DPO's (step2_dpo_finetuning) are step-2 flag
    lists (no flag of DPO's own): they parse with rlhf.reward, which trains a reward model, not DPO."""
    parser, flags = PARSERS[flag_set["step"]](), swapped(flag_set["flags"])
    args = parser.parse_args(flags)
    CHECKS[flag_set["step"]](args)
    for dest, value in expected_values(parser, flags).items():
        assert getattr(args, dest) == value, dest
    said = capsys.readouterr().err
    for flag in ("--deepspeed", "--num_padding_at_beginning", "--tp_gather_partition_size"):
        assert said.count(f"{flag}: accepted for DeepSpeed-Chat scripts, no effect here: ") == (flag in flags)


def test_the_flag_sets_cover_every_script_and_e2e_line():
    sources_listed = {s["source"] for s in DATA["flag_sets"]}
    scripts = {p for p in sources_listed if p.endswith(".sh")}
    assert len(scripts) == 37 and len(SCRIPT_SETS) == 82 and len(E2E_SETS) == 11  # 45b4b71 of DeepSpeedExamples
    assert {s["step"] for s in SCRIPT_SETS} == {"sft", "reward", "dpo", "ppo"}
    assert {s["deployment"] for s in SCRIPT_SETS} == {"single_gpu", "single_node", "multi_node"}
    for flag_set in SCRIPT_SETS:  # paths to swap in each; none of DPO's own flags in its scripts
        assert set(flag_set["flags"]) & set(LOCAL)
        assert flag_set["step"] != "dpo" or not set(flag_set["flags"]) & DPO_ONLY


@pytest.mark.parametrize("step", ["sft", "reward", "ppo", "dpo"])
def test_every_main_py_flag_is_known(step):
    """Every flag of DeepSpeed-Chat's main.py parsers (with deepspeed.add_config_arguments' four) is ours;
    those of DPO alone are refused naming DPO, the config files naming why."""
    parser = PARSERS[step]()
    flags = DATA["main_py"][step]["flags"]
    assert not [f for f in flags if f not in parser._option_string_actions]
    assert {f for f in flags if parser._option_string_actions[f].help.startswith("Refused: ")} == \
        {"--deepspeed_config", "--deepscale_config"} | (DPO_ONLY if step == "dpo" else set())


@pytest.mark.parametrize("flags, match", [
    (["--beta", "0.1"], r"--beta: DPO \(DeepSpeed-Chat's step2_dpo_finetuning\) is not implemented here"),
    (["--offload_reference_model"], "--offload_reference_model: DPO"),
    (["--deepspeed_config", "ds.json"], "--deepspeed_config: the DeepSpeed config is built from this command's"),
])
def test_refused_flags_say_why(flags, match, capsys):
    with pytest.raises(SystemExit):
        reward.parse_args(["--model_name_or_path", "m", "--output_dir", "o", *flags])
    assert re.search(match, capsys.readouterr().err)


def test_no_effect_flags_say_so_in_help():
    for build in (sft.build_parser, reward.build_parser, ppo_args.build_parser):
        helps = {a.option_strings[0]: a.help for a in build()._actions if a.option_strings}
        for flag in ("--deepspeed", "--deepscale", "--add_eot_token", "--eot_token"):
            assert helps[flag].startswith(NO_EFFECT) and len(helps[flag]) > len(NO_EFFECT) + 40, flag
        assert "Default Dahoas/rm-static" in helps["--data_path"]


@pytest.mark.parametrize("dtype, refused", [("fp16", True), ("bf16", False)])
def test_a_scripts_dtype_keeps_its_meaning(dtype, refused):
    """No DeepSpeed-Chat script passes --dtype (they rely on its fp16 default; ours is auto). One that adds
    it keeps its meaning: fp16 is refused on a CPU with the reason, bf16 runs."""
    flags = swapped(next(s for s in SCRIPT_SETS if s["source"].endswith("opt/single_node/run_1.3b.sh")
                         and s["step"] == "sft")["flags"])
    args = sft.build_parser().parse_args(flags + ["--dtype", dtype])
    if refused and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--dtype fp16"):
            check_args(args)
    else:
        check_args(args)
        assert args.dtype == dtype


def test_e2e_presets_are_the_scripts_flags():
    """rlhf.e2e_presets holds, for every script e2e_rlhf.py can run, that script's flags without paths."""
    def e2e_script(s):
        match = re.search(r"/opt/\w+/run_([\d.]+[mb])\.sh$", s["source"])
        sizes = e2e_presets.REWARD_SIZES if s["step"] == "reward" else e2e_presets.ACTOR_SIZES
        return match and s["step"] != "dpo" and match.group(1) in sizes and not s["script_args"]
    scripts = {s["source"].split("/training/", 1)[1]: s["flags"] for s in SCRIPT_SETS if e2e_script(s)}
    assert len(scripts) == 13 and set(e2e_presets.SCRIPT_FLAGS) == set(scripts)
    for path, flags in scripts.items():
        assert e2e_presets.SCRIPT_FLAGS[path].split() == without_paths(flags), path


STEP_PARSERS = {1: sft.build_parser, 2: reward.build_parser, 3: ppo_args.build_parser}


def e2e_model(flags: list[str], option: str, default: str) -> str:
    """The size e2e_rlhf.py makes of --actor-model / --reward-model (it strips facebook/opt-)."""
    return flags[flags.index(option) + 1].replace("facebook/opt-", "") if option in flags else default


@pytest.mark.parametrize("flag_set", E2E_SETS, ids=set_id)
def test_e2e_command_lines_become_the_scripts_steps(flag_set, tmp_path):
    """Each e2e_rlhf.py command line (output dir swapped): its sizes name facebook/opt-SIZE and the output
    folders SIZE, as e2e_rlhf.py does; each step parses, with its own parser, to the values of the script
    e2e_rlhf.py would run (the ZeRO stage: the one given, or the script's), and says which script."""
    flags = flag_set["flags"]
    args = train.parse_args(flags + ["--output-dir", str(tmp_path)])
    actor, rm = e2e_model(flags, "--actor-model", "1.3b"), e2e_model(flags, "--reward-model", "350m")
    steps, deployment = train.steps_of(args), args.deployment_type
    for n, size in ((1, actor), (2, rm), (3, actor)):
        assert steps[n].output_dir == str(tmp_path / train.FOLDERS[n] / size)
        parsed = STEP_PARSERS[n]().parse_args(train.step_flags(args, steps, n))
        path = f"/training/{e2e_presets.script_of(n, deployment, size)}"
        script = next((s for s in SCRIPT_SETS if s["source"].endswith(path)), None)
        expected = expected_values(STEP_PARSERS[n](), without_paths(script["flags"])) if script else {}
        given = {1: [("zero_stage", "--actor-zero-stage")], 2: [("zero_stage", "--reward-zero-stage")],
                 3: [("actor_zero_stage", "--actor-zero-stage"), ("critic_zero_stage", "--reward-zero-stage")]}[n]
        expected.update({dest: int(flags[flags.index(opt) + 1]) for dest, opt in given if opt in flags})
        assert {k: getattr(parsed, k) for k in expected} == expected
        if n != 3:
            assert parsed.model_name_or_path == f"facebook/opt-{size}"
        note = train.preset_note(args, n)
        assert (path.lstrip("/") in note) if script else "no script" in note


def test_e2e_zero_stage_forms():
    parse = lambda *f: train.parse_args(["--output-dir", "/o", *f])  # noqa: E731
    assert parse("--actor-zero-stage", "").actor_zero_stage is None
    assert parse("--actor-zero-stage", "3", "--reward-zero-stage", "0").reward_zero_stage == 0
    with pytest.raises(SystemExit):
        parse("--actor-zero-stage", "4")
    local = "/models/opt-6.7b"  # a downloaded copy: its size's settings, the path itself as the model
    assert e2e_presets.size_of(local) == "6.7b" and e2e_presets.hub_name(local) == local
    assert e2e_presets.size_of("meta-llama/Llama-2-7b-hf") is None and train.model_name("facebook/opt-13b") == "13b"


# --- the reward model's two formats -----------------------------------------------------------------

def ragged_rows(tokenizer, gen: torch.Generator, rows: int = 6) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Random words after a BOS, ragged lengths, right-padded (mask); no pad or EOS inside a row."""
    lengths = torch.randint(3, 24, (rows,), generator=gen).tolist()
    lengths[0] = max(lengths)
    ids = torch.randint(4, len(tokenizer), (rows, max(lengths)), generator=gen)
    ids[:, 0] = tokenizer.bos_token_id
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids, mask, 2


def step3_rows(tokenizer, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """DeepSpeed-Chat's step-3 layout: left-padded prompts of one width, then right-padded answers."""
    prompt_ids, prompt_mask, _ = ragged_rows(tokenizer, gen)
    shifts = (prompt_mask.shape[1] - prompt_mask.sum(1)).tolist()
    prompt_ids = torch.stack([row.roll(s) for row, s in zip(prompt_ids, shifts)])
    prompt_mask = torch.stack([row.roll(s) for row, s in zip(prompt_mask, shifts)])
    answer_ids, answer_mask, _ = ragged_rows(tokenizer, gen)
    return (torch.cat([prompt_ids, answer_ids[:, 1:]], 1), torch.cat([prompt_mask, answer_mask[:, 1:]], 1),
            prompt_ids.shape[1])


def scores_three_ways(directory: str, actor_dir: str, ids: torch.Tensor, mask: torch.Tensor, prompt_length: int):
    """The end scores of rows by DeepSpeed-Chat's loader (its step 3's tokenizer: the actor's, EOS as pad)
    and forward_value, by transformers' own pooling, and by ours; each gets the rows padded its way."""
    tokenizer, report = dschat.load_hf_tokenizer(actor_dir), {}
    theirs = dschat.create_critic_model(directory, tokenizer, num_padding_at_beginning=1, report=report)
    assert report == {"missing": [], "unexpected": [], "error_msgs": []}
    hf = AutoModelForSequenceClassification.from_pretrained(directory, dtype=torch.float32).eval()
    ours = load_reward_model(directory, hf.config, hf.config.pad_token_id).eval()
    with torch.no_grad():
        dschat_scores = theirs.float().eval().forward_value(ids.masked_fill(mask == 0, tokenizer.pad_token_id), mask,
                                                            prompt_length=prompt_length)["chosen_end_scores"]
        padded = ids.masked_fill(mask == 0, hf.config.pad_token_id)
        return dschat_scores, hf(input_ids=padded, attention_mask=mask).logits.squeeze(-1), \
            reward_scores(ours, padded, mask)


@pytest.mark.parametrize("vocab", [113, 130])  # the tokenizer's 113 tokens: 120 rows padded, or 130 cut to 120
def test_our_reward_checkpoint_scores_alike_in_dschat_transformers_and_here(tmp_path, vocab):
    base = tmp_path / "base"
    example.write_model(str(base), "tiny", seed=3)
    tokenizer = AutoTokenizer.from_pretrained(base)
    config = OPTConfig.from_pretrained(base, vocab_size=vocab, num_labels=1)
    torch.manual_seed(vocab)
    model = AutoModelForSequenceClassification.from_config(config)
    for p in model.parameters():  # random everywhere, biases and norms too
        p.data.normal_(0, 0.3)
    save_hf(model, tokenizer, str(tmp_path / "rm"),
            lambda plain, directory: reward.save_dschat_reward(plain, directory, tokenizer))
    dschat_state = torch.load(tmp_path / "rm" / "pytorch_model.bin")
    assert dschat_state["rwtransformer.decoder.embed_tokens.weight"].shape[0] == 120
    gen = torch.Generator().manual_seed(vocab)
    for ids, mask, prompt_length in (ragged_rows(tokenizer, gen), step3_rows(tokenizer, gen)):
        dschat_scores, hf_scores, our_scores = scores_three_ways(str(tmp_path / "rm"), str(base), ids, mask,
                                                                 prompt_length)
        torch.testing.assert_close(dschat_scores, hf_scores, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(our_scores, hf_scores, rtol=1e-5, atol=1e-6)
        assert hf_scores.std() > 0.01  # different rows, different scores: a real comparison


# --- hub, errors ------------------------------------------------------------------------------------

def test_an_unreachable_hub_is_one_line_with_the_fix(monkeypatch):
    monkeypatch.setattr(sources, "hub_unreachable", lambda: "the Hugging Face hub (https://hf.example) cannot be "
                                                            "reached from this machine: no route")
    with pytest.raises(sources.DataError) as error:
        sources.load_source("Dahoas/rm-static", seed=0, need_rejected=True)
    message = str(error.value)
    assert "\n" not in message and message.startswith("Dahoas/rm-static: not a local file or directory")
    assert "cannot be reached from this machine: no route" in message and "Give a local copy instead" in message
    with pytest.raises(sources.DataError, match="Give a local copy instead"):
        sources.check_hub_sources(["/no/such/dir", "Dahoas/rm-static"])


def test_offline_mode_skips_the_hub_probe(monkeypatch):
    def no_connection(*args, **kwargs):
        raise AssertionError("offline mode must not connect")
    monkeypatch.setattr(sources.socket, "create_connection", no_connection)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sources.hub_unreachable() is None


def test_a_step_refusing_bad_input_prints_one_line(tmp_path):
    """rlhf.cli: the error the checks raise, as one line, status 1, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "rlhf.sft", "--model_name_or_path", str(tmp_path / "none"),
                           "--data_path", str(tmp_path / "none.json"), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --model_name_or_path '{tmp_path / 'none'}'")


# --- rlhf.train's processes -------------------------------------------------------------------------

def test_stop_group_ends_every_process_of_the_group_and_kills_what_ignores_sigterm():
    code = "import signal, subprocess, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
           "subprocess.Popen(['sleep', '300']); print('up', flush=True); time.sleep(300)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline() == b"up\n" and len(step_process.group_members(proc.pid)) == 2
    start = time.monotonic()
    step_process.stop_group(proc, grace_s=1)
    assert step_process.group_members(proc.pid) == [] and proc.returncode == -signal.SIGKILL
    assert time.monotonic() - start < 5
    proc.stdout.close()


def test_stale_build_locks_are_removed_and_held_ones_kept(tmp_path):
    (tmp_path / "stale_op").mkdir()
    (tmp_path / "stale_op" / "lock").touch()
    (tmp_path / "held_op").mkdir()
    code = f"import os, time; os.open({str(tmp_path / 'held_op' / 'lock')!r}, os.O_CREAT | os.O_EXCL); " \
           "print('held', flush=True); time.sleep(300)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        assert step_process.lock_holders(tmp_path / "held_op" / "lock") == [holder.pid]
        assert step_process.remove_stale_locks(str(tmp_path)) == [tmp_path / "stale_op" / "lock"]
        assert step_process.build_locks(str(tmp_path)) == [tmp_path / "held_op" / "lock"]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_silent_step_gets_progress_naming_the_build(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(step_process, "QUIET_S", 0.3)
    (tmp_path / "ext" / "some_op").mkdir(parents=True)
    lock = tmp_path / "ext" / "some_op" / "lock"
    code = f"import os, time; fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL); time.sleep(1.5); " \
           f"os.close(fd); os.remove({str(lock)!r}); print('built')"
    log = tmp_path / "training.log"
    code = step_process.run_group([sys.executable, "-c", code], {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")},
                                  str(log), False, "[step 9]")
    out = capsys.readouterr().out
    assert code == 0 and "built" in log.read_text(), out
    assert re.search(r"\[step 9\] no output for \d+ s; building some_op in .*some_op \(pid \d+: .*python", out)
