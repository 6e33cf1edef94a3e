"""Other generation engines measured beside ours by bench.generation, each run by bench/baseline_runner.py
in a subprocess of its own venv (made by scripts/make_baseline_venv.sh) on the same checkpoint and
prompts, talking JSON files. `transformers` runs in this venv: the stand-in the tests use."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from bench.checkpoints import make_tokenizer
from hybrid_engine.memory import return_freed_memory

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).with_name("baseline_runner.py")
VENV_ENGINES = ("vllm", "ctranslate2")
ENGINES = (*VENV_ENGINES, "transformers")
DEFAULT_VENVS = ROOT / ".baselines"


def python_of(engine: str, venvs: Path) -> str:
    """The interpreter of engine's venv; a missing venv is a one-line error that names its script."""
    if engine not in VENV_ENGINES:
        return sys.executable
    python = venvs / engine / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"--baseline {engine}: no venv at {python.parents[1]}; make it with "
                         f"`bash scripts/make_baseline_venv.sh {engine}`")
    return str(python)


def kv_cache_bytes(model: PreTrainedModel, tokens: int) -> int:
    """Bytes of KV cache for an engine that sizes its own: twice what `tokens` tokens take, so that block
    rounding never refuses the batch, and no more (vLLM's default share of the RAM does not fit beside
    OPT-1.3b on a 24 GiB machine)."""
    config = model.config
    return 2 * tokens * 2 * config.num_hidden_layers * config.hidden_size * model.dtype.itemsize


def save_checkpoint(model: PreTrainedModel, directory: str) -> str:
    """`model` and a tokenizer saved once for every baseline, as directory/model; the heap that saving
    freed goes back to the system (at OPT-1.3b fp32, saving left this process holding about three copies
    of the weights, and a baseline's own beside them ran out of 24 GiB)."""
    model_dir = os.path.join(directory, "model")
    model.save_pretrained(model_dir)
    tokenizer = make_tokenizer(model.config)
    # CTranslate2's converter records the BOS and UNK tokens and refuses none; OPT's BOS is its EOS.
    tokenizer.bos_token, tokenizer.unk_token = tokenizer.eos_token, tokenizer.pad_token
    tokenizer.save_pretrained(model_dir)
    return_freed_memory()
    return model_dir


def run_baseline(engine: str, python: str, model_dir: str, prompts: torch.Tensor, new_tokens: int, dtype: str,
                 kv_cache_bytes: int, timeout_s: float) -> dict:
    """Generate with `engine` on the checkpoint in model_dir (see save_checkpoint) in a subprocess with
    this process's environment (OMP_WAIT_POLICY, thread count) and return its result (see
    baseline_runner.py). A runner that fails is a one-line error followed by its output's tail."""
    with tempfile.TemporaryDirectory(prefix=f"baseline-{engine}-") as tmp:
        request = {"engine": engine, "model_dir": model_dir, "prompts": prompts.tolist(), "new_tokens": new_tokens,
                   "dtype": dtype, "threads": torch.get_num_threads(), "kv_cache_bytes": kv_cache_bytes,
                   "launched": time.time()}
        paths = {name: os.path.join(tmp, name) for name in ("request.json", "result.json", "output.txt")}
        Path(paths["request.json"]).write_text(json.dumps(request))
        with open(paths["output.txt"], "w") as output:
            # -I: the runner's own directory (bench/) must not shadow the engine's imports (bench/kernels.py is
            # not the `kernels` package that transformers probes for)
            done = subprocess.run([python, "-I", str(RUNNER), paths["request.json"], paths["result.json"]],
                                  stdout=output, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  env={**os.environ, "OMP_NUM_THREADS": str(request["threads"])})
        if done.returncode != 0:
            tail = Path(paths["output.txt"]).read_text().strip().splitlines()[-15:]
            raise SystemExit(f"--baseline {engine} failed (exit {done.returncode}, {python}); its output ends:\n  "
                             + "\n  ".join(tail))
        return json.loads(Path(paths["result.json"]).read_text())
