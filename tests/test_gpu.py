"""The engine and the RLHF steps on CUDA, skipped without a GPU (CI has none; the device run of
scripts/gpu_check.sh runs them with `pytest --device cuda`): HybridEngine under ZeRO-3 against
transformers (fp32, TF32 off, NCCL), PPO steps through the hybrid engine, and rlhf.train's example."""
import os
import subprocess
import sys

import pytest
import torch
from test_engine import check_engine_results, engine_worker
from test_rlhf_ppo import check_trained_and_saved, config_worker, task  # noqa: F401 (task is a fixture)

from bench.launch import run_ranks

pytestmark = pytest.mark.cuda
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("family, tp", [("opt", 1), ("llama", 1), ("opt", 2), ("llama", 2)])
def test_hybrid_engine_zero3_equals_transformers_on_cuda(family, tp):
    if torch.cuda.device_count() < tp:
        pytest.skip(f"tp {tp} needs {tp} GPUs, this machine has {torch.cuda.device_count()}")
    results = run_ranks(tp, engine_worker, family, tp, 3, "cuda")
    assert all(r["device"].startswith("cuda") for r in results)
    check_engine_results(results)


def test_ppo_steps_through_the_hybrid_engine_on_cuda(task, tmp_path):  # noqa: F811
    extra = ["--actor_zero_stage", "3", "--critic_zero_stage", "3", "--enable_hybrid_engine", "--dtype", "bf16"]
    run_ranks(1, config_worker, task, str(tmp_path), extra)
    check_trained_and_saved(task, str(tmp_path), extra)


def test_rlhf_train_example_on_cuda(tmp_path):
    cmd = [sys.executable, "-m", "rlhf.train", "--example", "--example-size", "tiny", "--example-records", "400",
           "--num-gpus", "1", "--output-dir", str(tmp_path), "--step3-args", "--max_steps 4 --eval_prompts 8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for n in (1, 2, 3):
        assert f"[step {n}] finished in" in proc.stdout
    assert "--module rlhf.ppo" in proc.stdout and "reward curve (step 3):" in proc.stdout
