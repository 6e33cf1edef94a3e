"""Every benchmark runs end to end, smoke-sized, and writes the JSON it promises. No timing is
checked; each test checks something that would be false if the benchmark measured the wrong thing
(our tokens equal HF's, our kernels equal the reference, bytes equal what the layout implies)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import OPTForCausalLM

from bench import baselines
from bench.zero3 import DTYPES, MODELS
from hybrid_engine.capability import choose_dtype, device_caps
from hybrid_engine.models import weight_map
from test_reshard_zero3 import analytic_minimum

ROOT = Path(__file__).resolve().parents[1]


def run_bench(module: str, out: Path, *args: str, zero3: bool = True) -> dict:
    cmd = [sys.executable, "-m", module, *(("--model", "tiny", "--world", "2") if zero3 else ()), "--out", str(out),
           *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_reshard_benchmark(tmp_path):
    result = run_bench("bench.reshard", tmp_path / "reshard.json", "--tp", "2", "--repeat", "1", "--bucket-mb", "1")
    assert result["identical"]
    summary = result["summary"]
    assert set(summary) == {"ours", "layer_groups", "per_param"}
    assert len(result["rows"]) == 2 * 3
    # Bytes from the layout alone: a full gather delivers (world - 1) / world of the model to each
    # rank; ours delivers exactly the rank's TP slices that lie outside its own ZeRO-3 range.
    config = MODELS["tiny"]()
    model = OPTForCausalLM(config)
    element_size = DTYPES[result["args"]["dtype"]].itemsize
    assert result["args"]["dtype"] == result["environment"]["dtype"] == choose_dtype("auto").name  # the default
    model_bytes = sum(p.numel() for p in model.parameters()) * element_size
    assert abs(summary["per_param"]["bytes_received"] - model_bytes / 2) <= 2 * len(list(model.parameters())) * element_size
    for row in result["rows"]:
        if row["side"] == "ours":
            assert row["bytes_received"] == analytic_minimum(weight_map(config), 2, row["rank"], 2, element_size)


def test_zero3_generation_benchmark(tmp_path):
    result = run_bench("bench.zero3_generation", tmp_path / "gen.json", "--dtype", "fp32", "--batch", "2",
                       "--prompt-len", "7", "--new-tokens", "5", "--slow-new-tokens", "3")
    summary = {row["path"]: row for row in result["summary"]}
    assert set(summary) == {"zero3_hf", "gather_once", "hybrid_tp1", "hybrid_tp2"}
    assert summary["zero3_hf"]["extrapolated"] and not summary["hybrid_tp2"]["extrapolated"]
    # The slow path ran 3 tokens, but its tokens/s is for the 5 of every other path (time extrapolated).
    slow = summary["zero3_hf"]
    assert slow["measured_e2e_s"] != slow["e2e_s"] and slow["tokens_per_s"] == pytest.approx(2 * 5 / slow["e2e_s"])
    assert all(row["agreement"] == 1.0 and row["tokens_per_s"] > 0 for row in summary.values())
    assert summary["hybrid_tp2"]["reshard_s"] > 0
    assert len(result["tokens"]["rank1"]["hybrid_tp2"]) == 2  # this rank's rows only
    assert len(result["tokens"]["rank0"]["zero3_hf"][0]) == 3


def test_generation_benchmark(tmp_path):
    # transformers in a subprocess of this venv stands in for vLLM and CTranslate2 (CI has no baseline venv):
    # the same runner protocol, checkpoint and timing bookkeeping.
    result = run_bench("bench.generation", tmp_path / "gen.json", "--model", "opt-125m", "--batch", "2",
                       "--prompt-len", "9", "--new-tokens", "5", "--threads", "1", "--dtype", "fp32",
                       "--baseline", "transformers", zero3=False)
    assert result["token_agreement"] == 1.0  # fp32 greedy: our tokens are HF's
    # Figures say which machine and dtype they came from.
    env = result["environment"]
    assert env["dtype"] == "fp32" and env["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu_caps"] == device_caps("cpu").as_dict()
    hf, ours, baseline = result["rows"]
    assert (hf["side"], ours["side"], baseline["side"]) == ("hf_generate", "hybrid_engine", "transformers")
    # Measured from the same state (one copy of the weights); ours allocates its prepacked copies
    # (about the weights' size, 0.47 GiB for opt-125m in fp32) inside the measurement.
    assert abs(hf["rss_before_gib"] - ours["rss_before_gib"]) < 0.15
    assert ours["run_growth_gib"] > 0.3
    # The floor is made of the parts it prints (whether a side runs above it depends on the machine's
    # load while each was measured, so it is not asserted here).
    floor = result["floor"]
    read_bytes = floor["weight_bytes"] + floor["kv_bytes_mean"]
    assert floor["memory_floor_ms"] == pytest.approx(read_bytes / floor["read_bandwidth_gbs"] / 1e6)
    assert floor["compute_floor_ms"] == pytest.approx(floor["decode_flops"] / floor["peak_gemm_gflops"] / 1e6)
    assert floor["floor_ms"] == max(floor["memory_floor_ms"], floor["compute_floor_ms"])
    for row in result["rows"]:
        assert row["x_floor"] == pytest.approx(row["decode_ms_per_step"] / floor["floor_ms"])
    # The baseline ran the same checkpoint and prompts in its own process: the same model in fp32 greedy
    # gives our tokens, and its timing is reported beside ours, its startup apart.
    versus = result["baselines"]["transformers"]
    assert versus["token_agreement"] == 1.0 and versus["first_divergent_step"] is None
    assert versus["startup_s"] > 0 and versus["version"] == transformers.__version__
    assert versus["speedup_decode"] == pytest.approx(baseline["decode_ms_per_step"] / ours["decode_ms_per_step"])
    assert baseline["ours_faster_prefill"] == pytest.approx(baseline["prefill_ms"] / ours["prefill_ms"])
    assert baseline["tokens_per_s"] == pytest.approx(2 * 5 / baseline["total_s"])


def test_generation_baseline_without_venv(tmp_path):
    cmd = [sys.executable, "-m", "bench.generation", "--baseline", "vllm", "--baseline-venvs", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    # before anything is built or timed: the last line, after the dtype line, and no traceback
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"--baseline vllm: no venv at {tmp_path / 'vllm'}; make it with `bash scripts/make_baseline_venv.sh vllm`")


def test_generation_baseline_that_fails_to_start(tmp_path):
    """A baseline whose process dies: one line that names it, then the tail of what it printed."""
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'loading the engine' >&2\necho 'ImportError: no module named vllm._C' >&2\n"
                      "exit 3\n")
    python.chmod(0o755)
    model = OPTForCausalLM(MODELS["tiny"]())
    with pytest.raises(SystemExit) as failed:
        baselines.run_baseline("vllm", str(python), baselines.save_checkpoint(model, str(tmp_path)),
                               torch.randint(3, 50, (2, 4)), 3, "fp32", kv_cache_bytes=2**20, timeout_s=60)
    lines = str(failed.value).splitlines()
    assert lines[0].startswith("--baseline vllm failed (exit 3")
    assert lines[1:] == ["  loading the engine", "  ImportError: no module named vllm._C"]


def test_kernels_benchmark(tmp_path):
    result = run_bench("bench.kernels", tmp_path / "kernels.json", "--batches", "3", "--contexts", "40", "--dtypes",
                       "fp32", "--prefill-seqs", "2", "--prefill-len", "33", "--elementwise-tokens", "16",
                       "--cache-bytes", "1e6", "--repeat", "1", "--ref-repeat", "1", zero3=False)
    rows = result["decode"] + result["prefill"]
    assert len(rows) == 2 and all(row["max_error_vs_ref"] < 1e-4 for row in rows)
    assert all("ref/ours" not in row for row in rows)  # the Python-loop reference is no baseline
    assert len(result["elementwise"]) == 3


def test_allocator_benchmark(tmp_path):
    result = run_bench("bench.allocator", tmp_path / "allocator.json", "--steps", "3", "--repeat", "1",
                       "--prompt-len", "20", zero3=False)
    assert result["identical"]
    assert [row["case"] for row in result["results"]] == ["append x256 seqs", "append x1024 seqs",
                                                          "allocate+append x256+free, 256 seqs"]


def test_trl_benchmark(tmp_path):
    pytest.importorskip("trl")
    result = run_bench("bench.trl", tmp_path / "trl.json", "--reward-model", "tiny", "--dtype", "fp32", "--batch", "4",
                       "--num-generations", "2", "--prompt-len", "8", "--completion-len", "6", "--steps", "1")
    trl_row, ours = result["paths"]["trl"], result["paths"]["hybrid_engine"]
    for row in (trl_row, ours):
        assert row["world_seen_by_trl"] == 2  # one world of 2 ranks, not two worlds of 1
        assert row["mean_completion_lengths"] == [6.0]  # forced on both paths: the same tokens to generate
        step = row["steps"][0]
        assert all(step[p] > 0 for p in ("generation", "reward", "scoring", "training"))
    # the generation phase wraps our generation (and its reshard): its own clock cannot exceed the phase's
    metrics = ours["hybrid_engine_metrics"]
    assert 0 < metrics["generation_seconds"][0] + metrics["reshard_seconds"][0] <= ours["steps"][0]["generation"]
    assert metrics["reshard_bytes"][0] > 0  # ZeRO-3 shards moved between the ranks
    assert result["ratios"]["generation_s"] == pytest.approx(trl_row["generation_s"] / ours["generation_s"])
    assert result["environment"]["dtype"] == "fp32"
