"""bench.e2e end to end at a tiny size on 2 ranks, all three paths: the JSON it promises, phases that
fit inside their iteration, the same forced number of tokens on every path, an extrapolation that
says so and is the formula it claims, and the Figure-5 plot; for GRPO, no critic step and the prompt
KV its forks save. No timing is compared."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.e2e import memory_plan, parse_args, random_tokens

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("ds_chat", "gather_once", "hybrid_engine")
WORLD, BATCH, ANSWER, TIMED, WARMUP = 2, 2, 6, 3, 2
GROUP, GROUP_PROMPT, BLOCK = 3, 37, 16  # the KV cache's default block size


def run_e2e(out: Path, *extra: str) -> tuple[dict, Path, str]:
    cmd = [sys.executable, "-m", "bench.e2e", "--model", "tiny", "--reward-model", "tiny", "--world", str(WORLD),
           "--batch", str(BATCH), "--answer-len", str(ANSWER), "--iterations", "1", "--out", str(out), *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text()), out, done.stdout


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("e2e") / "e2e.json"
    return run_e2e(out, "--prompt-len", "7", "--slow-answer-len", str(TIMED), "--warmup-answer-len", str(WARMUP))


@pytest.fixture(scope="module")
def grpo(tmp_path_factory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("e2e") / "grpo.json"
    return run_e2e(out, "--algorithm", "grpo", "--samples", str(GROUP), "--prompt-len", str(GROUP_PROMPT),
                   "--paths", "ds_chat", "hybrid_engine")


def test_json_shape_and_phases_within_the_iteration(result):
    data, out, stdout = result
    assert set(data) == {"config", "paths"} and set(data["paths"]) == set(PATHS)
    assert data["config"]["environment"]["OMP_WAIT_POLICY"] == "PASSIVE"
    for name, row in data["paths"].items():
        phases = [row["generation_s"], row["experience_s"], row["training_s"]]
        assert min(phases) > 0, name
        assert sum(phases) <= row["iteration_s"], name
        assert row["training_s"] == pytest.approx(row["actor_training_s"] + row["critic_training_s"])
        assert row["iteration_s_per_seq"] == pytest.approx(row["iteration_s"] / (WORLD * BATCH))
        assert row["tokens_per_s"] == pytest.approx(WORLD * BATCH * ANSWER / row["generation_s"])
        assert len(row["peak_rss_gib_per_rank"]) == WORLD and min(row["peak_rss_gib_per_rank"]) > 0.1
        usage = row["phase_usage_per_rank"]  # per phase and rank: peaks within the rank's measured peak
        assert set(usage) == {"generation", "experience", "training"}
        for rank in range(WORLD):
            peaks = [usage[p][rank]["peak_rss_bytes"] / 2**30 for p in usage]
            assert min(peaks) > 0.1 and max(peaks) == pytest.approx(row["peak_rss_iterations_gib_per_rank"][rank])
            assert max(peaks) <= row["peak_rss_gib_per_rank"][rank]
            assert all(usage[p][rank]["cpu_s"] > 0 and usage[p][rank]["minor_faults"] >= 0 for p in usage)
        assert row["x_vs_ds_chat"]["iteration_s"] == pytest.approx(
            data["paths"]["ds_chat"]["iteration_s"] / row["iteration_s"])
        assert name in stdout
        # the actor's old logprobs as sampled only on our path, and there only in fp32 (rlhf's auto)
        sampled = name == "hybrid_engine" and data["config"]["dtype"] == "fp32"
        assert row["old_logprobs_from"] == ("generation" if sampled else "training"), name
    # the switch to generation is timed inside generation, and only on the path that does it
    assert 0 < data["paths"]["hybrid_engine"]["reshard_s"] < data["paths"]["hybrid_engine"]["generation_s"]
    assert 0 < data["paths"]["gather_once"]["gather_s"] < data["paths"]["gather_once"]["generation_s"]
    assert "reshard_s" not in data["paths"]["ds_chat"] and "gather_s" not in data["paths"]["hybrid_engine"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    per_phase = stdout.split("per phase: seconds")[1].splitlines()
    assert per_phase[1].split()[:4] == ["phase", "ds_chat_s", "ds_chat_%", "gather_once_s"]
    assert [line.split()[0] for line in per_phase[2:6]] == ["generation", "experience", "training", "iteration"]
    assert per_phase[5].split()[2] == "100"  # the iteration is all of itself
    for title in ("peak RSS, GiB", "CPU seconds", "minor page faults"):
        assert f"per phase and rank: {title}" in stdout


def test_every_path_trains_on_the_same_forced_number_of_tokens(result):
    # the warm-up's shorter answers (WARMUP tokens, even below ds_chat's TIMED) leave the measured ones whole
    paths = result[0]["paths"]
    assert {row["generated_tokens"] for row in paths.values()} == {WORLD * BATCH * ANSWER}
    assert result[0]["config"]["warmup_answer_len"] == WARMUP and f"1 warm-up (answer {WARMUP})" in result[2]


def refusal(capsys, *argv: str) -> str:
    """What parse_args prints when it refuses argv (it must refuse)."""
    with pytest.raises(SystemExit):
        parse_args(["--model", "opt-125m", *argv])
    return capsys.readouterr().err


def test_samples_default_and_least_follow_rlhf(capsys):
    assert parse_args(["--model", "opt-125m"]).samples == 1
    assert parse_args(["--model", "opt-125m", "--algorithm", "rloo"]).samples == 8
    assert "--samples must be >= 2 for --algorithm grpo, got 1" in refusal(capsys, "--algorithm", "grpo",
                                                                            "--samples", "1")


def test_warmup_answer_len_defaults_short_only_for_1b_actors(capsys):
    assert parse_args(["--model", "opt-1.3b"]).warmup_answer_len == 32
    assert parse_args(["--model", "opt-125m"]).warmup_answer_len == 256
    assert parse_args(["--model", "opt-125m", "--answer-len", "20"]).warmup_answer_len == 20
    assert "--warmup-answer-len must be in [2, --answer-len=20], got 21" in refusal(
        capsys, "--answer-len", "20", "--warmup-answer-len", "21")


def test_extrapolation_is_said_and_is_the_stated_formula(result):
    paths = result[0]["paths"]
    slow = paths["ds_chat"]
    assert slow["extrapolated"] and slow["timed_answer_tokens"] == TIMED
    assert not any(paths[p]["extrapolated"] for p in ("gather_once", "hybrid_engine"))
    assert all(paths[p]["timed_answer_tokens"] == ANSWER for p in ("gather_once", "hybrid_engine"))
    one, timed = slow["one_token_generation_s"], slow["timed_generation_s"]
    assert slow["generation_s"] == pytest.approx(one + (ANSWER - 1) * (timed - one) / (TIMED - 1))
    assert f"yes ({TIMED} timed)" in result[2]


def test_random_tokens_are_never_special():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    import torch

    vocab = {("<pad>" if i == 1 else "</s>" if i == 2 else f"t{i}"): i for i in range(6)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                  eos_token="</s>", pad_token="<pad>")
    ids = random_tokens((200, 50), tok, torch.Generator().manual_seed(0))
    assert set(ids.unique().tolist()) == {0, 3, 4, 5}


def test_memory_plan_refuses_what_does_not_fit(monkeypatch, capsys):
    from bench import e2e

    args = parse_args(["--model", "opt-1.3b", "--lora-dim", "0", "--no-gradient-checkpointing", "--dtype", "bf16"])
    plan = memory_plan(args, "gather_once", 1, 10**15)
    # a full-parameter 1.3B actor: 16 bytes per parameter over 2 ranks in its optimizer alone
    assert plan["actor optimizer"] == pytest.approx(1.316e9 * 16 / 2, rel=0.01)
    uncached = plan["peak"] - plan[e2e.CACHE_PART]
    monkeypatch.setattr(e2e, "mem_available", lambda: int(uncached * 2) - 1)
    with pytest.raises(SystemExit, match="refused.*--lora-dim 128"):
        e2e.check_memory(args, [("gather_once", 1)])
    monkeypatch.setattr(e2e, "mem_available", lambda: int(uncached * 2) + 1)
    e2e.check_memory(args, [("gather_once", 1)])
    assert "gather_once" in capsys.readouterr().out


@pytest.mark.parametrize("spare_gib", [0.0, 0.5, 100.0])
def test_memory_plan_gives_the_cpu_cache_only_the_memory_left(monkeypatch, spare_gib):
    """The cache's share is CACHE_HEADROOM x the itemised bytes, cut to what the rest of the plan leaves on
    each rank, so it never makes a run refused; without the cache installed it is 0."""
    from bench import e2e
    from hybrid_engine.memory import CACHE_HEADROOM

    args = parse_args(["--model", "opt-1.3b", "--dtype", "bf16"])
    unbounded = memory_plan(args, "hybrid_engine", 2, 10**15)
    uncached = unbounded["peak"] - unbounded[e2e.CACHE_PART]
    itemised = uncached - unbounded["runtime (torch, DeepSpeed, gloo)"] - unbounded["unitemised (0.1 x itemised + 1 GiB)"]
    available = math.ceil(2 * (uncached + spare_gib * e2e.GIB))
    monkeypatch.setattr(e2e, "mem_available", lambda: available)
    monkeypatch.setattr(e2e._C, "cpu_cache_installed", lambda: True)
    cached = memory_plan(args, "hybrid_engine", 2, available)[e2e.CACHE_PART]
    assert cached == pytest.approx(min(CACHE_HEADROOM * itemised, spare_gib * e2e.GIB), abs=e2e.MIB)
    e2e.check_memory(args, [("hybrid_engine", 2)])  # the plan fits what is available, to the byte
    # the plans and the check read the memory once: a machine whose free memory moves between two reads does
    # not refuse a plan that fit the first
    reads = iter(range(available, 0, -e2e.GIB))
    monkeypatch.setattr(e2e, "mem_available", lambda: next(reads))
    e2e.check_memory(args, [("hybrid_engine", 2)])
    monkeypatch.setattr(e2e, "mem_available", lambda: available)
    monkeypatch.setattr(e2e._C, "cpu_cache_installed", lambda: False)
    assert memory_plan(args, "hybrid_engine", 2, available)[e2e.CACHE_PART] == 0


def test_grpo_trains_no_critic_on_every_answer_of_every_group(grpo):
    data, out, stdout = grpo
    assert data["config"]["algorithm"] == "grpo" and set(data["paths"]) == {"ds_chat", "hybrid_engine"}
    for row in data["paths"].values():
        assert "critic_training_s" not in row and row["training_s"] == pytest.approx(row["actor_training_s"])
        assert row["generated_tokens"] == WORLD * BATCH * GROUP * ANSWER
        assert row["iteration_s_per_seq"] == pytest.approx(row["iteration_s"] / (WORLD * BATCH * GROUP))
    assert out.with_suffix(".png").exists() and "grpo, 3 answers per prompt" in stdout


def test_grpo_prompt_kv_saved_is_the_prompts_full_blocks_held_once(grpo):
    """Forked, each prompt's full blocks are held once for its G answers; repeated, G times. The peaks
    differ by (G - 1) x the full prompt blocks of the batch; the partial last block is copied per answer."""
    per_rank = grpo[0]["paths"]["hybrid_engine"]["prompt_kv_per_rank"]
    assert len(per_rank) == WORLD
    for kv in per_rank:
        saved_blocks = kv["repeated_peak_blocks"] - kv["forked_peak_blocks"]
        assert saved_blocks == BATCH * (GROUP - 1) * (GROUP_PROMPT // BLOCK)
        assert kv["saved_bytes"] == saved_blocks * kv["block_bytes"] > 0
        assert kv["forked_peak_bytes"] == kv["forked_peak_blocks"] * kv["block_bytes"]
    assert "MiB of prompt KV saved" in grpo[2]
