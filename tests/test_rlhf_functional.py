"""Steps 1 and 2 end to end on the shipped synthetic task (rlhf.example, tiny OPT), in one process
and on 2 gloo ranks under ZeRO-3: SFT must cut the eval perplexity to under half of the untrained
model's, and the reward model must rank at least 85% of the held-out pairs right (the CI budget
allows 1-2 short epochs; the full example run in the README reaches 90%+)."""
import json
import os

import pytest

from bench.launch import run_ranks
from rlhf import example

PERPLEXITY_RATIO = 0.5
ACCURACY = 0.85


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("task")
    example.write_data(str(root / "data"), num_records=3000, seed=1234)
    example.write_model(str(root / "base"), size="tiny", seed=1234)
    return str(root)


def evals(output_dir: str) -> list[dict]:
    with open(os.path.join(output_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "eval"]


def pipeline_worker(rank: int, world: int, root: str, extra: list[str]) -> dict:
    """rlhf.sft then rlhf.reward on the SFT checkpoint, as the command lines would run them."""
    from rlhf import reward, sft
    out = f"{root}/world{world}"
    common = ["--data_path", f"{root}/data", "--data_split", "1,1,0", "--data_output_path", f"{root}/cache",
              "--max_seq_len", "64", "--per_device_eval_batch_size", "64", "--eval_iters", "0",
              "--per_device_train_batch_size", str(16 // world), *extra]
    sft.main(common + ["--model_name_or_path", f"{root}/base", "--output_dir", f"{out}/sft",
                       "--learning_rate", "3e-3", "--num_train_epochs", str(3 - world)])
    reward.main(common + ["--model_name_or_path", f"{out}/sft", "--output_dir", f"{out}/rm", "--learning_rate", "2e-3"])
    return {"sft": evals(f"{out}/sft"), "rm": evals(f"{out}/rm")} if rank == 0 else {}


@pytest.mark.parametrize("world, extra", [(1, []), (2, ["--zero_stage", "3"])])
def test_sft_then_reward_model(task, world, extra):
    logs = run_ranks(world, pipeline_worker, task, extra)[0]
    before, after = logs["sft"][0]["perplexity"], logs["sft"][-1]["perplexity"]
    assert after < PERPLEXITY_RATIO * before, (before, after)
    assert logs["rm"][0]["accuracy"] < 0.7  # an untrained head ranks pairs at about chance
    final = logs["rm"][-1]
    assert final["accuracy"] >= ACCURACY and final["chosen_score"] > final["rejected_score"], final
