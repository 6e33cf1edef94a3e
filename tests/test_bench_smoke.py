"""The ZeRO-3 benchmarks run end to end (2 gloo ranks, tiny model) and write the JSON they promise.
No timing is checked: only that every side ran, agreed, and reported its numbers."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(module: str, out: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", module, "--model", "tiny", "--world", "2", "--out", str(out), *args]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_reshard_benchmark(tmp_path):
    result = run_bench("bench.reshard", tmp_path / "reshard.json", "--tp", "2", "--repeat", "1", "--bucket-mb", "1")
    assert result["identical"]
    summary = result["summary"]
    assert set(summary) == {"ours", "layer_groups", "per_param"}
    assert len(result["rows"]) == 2 * 3
    # tp = world = 2: column-parallel slices are already local, so ours receives less than a full gather.
    assert 0 < summary["ours"]["bytes_received"] < summary["layer_groups"]["bytes_received"]
    assert summary["layer_groups"]["bytes_received"] == summary["per_param"]["bytes_received"]
    assert all(side["seconds"] > 0 and side["computed_peak_bytes"] > 0 for side in summary.values())


def test_zero3_generation_benchmark(tmp_path):
    result = run_bench("bench.zero3_generation", tmp_path / "gen.json", "--dtype", "fp32", "--batch", "2",
                       "--prompt-len", "7", "--new-tokens", "5", "--slow-new-tokens", "3")
    summary = {row["path"]: row for row in result["summary"]}
    assert set(summary) == {"zero3_hf", "gather_once", "hybrid_tp1", "hybrid_tp2"}
    assert summary["zero3_hf"]["extrapolated"] and not summary["hybrid_tp2"]["extrapolated"]
    assert all(row["agreement"] == 1.0 and row["tokens_per_s"] > 0 for row in summary.values())
    assert summary["hybrid_tp2"]["reshard_s"] > 0
    assert len(result["tokens"]["rank1"]["hybrid_tp2"]) == 2  # this rank's rows only
    assert len(result["tokens"]["rank0"]["zero3_hf"][0]) == 3
