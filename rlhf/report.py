"""What a finished step 3 shows: the reward curve (printed and as a PNG), the time of each PPO phase
per iteration (PNG), and the SFT and PPO actors' answers to the same prompts side by side.

Reads OUT/step3-models/NAME/log.jsonl: lines {"kind": "train", "step", "reward_mean", "time_<phase>_s"...}
and {"kind": "eval", "step", "reward_mean", "task_score"...}. Missing keys are tolerated: a curve is
drawn for whatever the log holds, and every time_*_s key but time_total_s is a phase.
"""
import json
import os

TOTAL_TIME = "time_total_s"
PHASE_ORDER = ("generation", "reshard", "experience", "actor", "critic")  # as an iteration runs them
NESTED = {"time_generation_s": "time_reshard_s"}  # generation's time includes the reshard: stack it once


def read_log(path: str) -> list[dict]:
    """The records of the last run in a log.jsonl, in step order. A fresh run starts with an eval at step 0
    (earlier records are another run's); a resumed run repeats the steps after its checkpoint (the latest
    record of each kind and step wins)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    starts = [i for i, r in enumerate(records) if r.get("kind") == "eval" and r.get("step") == 0]
    latest = {(r.get("kind"), r.get("step")): r for r in records[starts[-1] if starts else 0:]}
    return sorted(latest.values(), key=lambda r: r.get("step", 0))


def series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in records if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
    return [r["step"] for r in rows], [float(r[key]) for r in rows]


def phase_keys(records: list[dict]) -> list[str]:
    """time_<phase>_s keys of the train records, the total left out, known phases in the order an iteration
    runs them, then any others as first seen."""
    keys = {}
    for r in records:
        if r.get("kind") == "train":
            keys.update((k, None) for k in r if k.startswith("time_") and k.endswith("_s") and k != TOTAL_TIME)

    def order(key: str) -> int:
        name = key[len("time_"):]
        return next((i for i, phase in enumerate(PHASE_ORDER) if name.startswith(phase)), len(PHASE_ORDER))
    return sorted(keys, key=order)


def reward_table(records: list[dict], max_rows: int = 20) -> str:
    """The train reward curve (at most max_rows evenly spaced steps, the last always) and the evals."""
    steps, rewards = series(records, "train", "reward_mean")
    lines = []
    if steps:
        stride = max(1, -(-len(steps) // max_rows))
        picks = sorted(set(range(0, len(steps), stride)) | {len(steps) - 1})
        lines += ["step  reward_mean"] + [f"{steps[i]:>4}  {rewards[i]:+.4f}" for i in picks]
    for r in (r for r in records if r.get("kind") == "eval"):
        metrics = ", ".join(f"{k} {r[k]:+.4f}" for k in ("reward_mean", "task_score") if k in r)
        lines.append(f"eval at step {r['step']}: {metrics}")
    return "\n".join(lines) if lines else "(no reward records in the log)"


def plot_rewards(records: list[dict], path: str) -> bool:
    """Train reward_mean (and its moving average reward_ema) per step, eval reward_mean and task_score;
    False when there is nothing to draw."""
    curves = [("train reward_mean", *series(records, "train", "reward_mean"), "-"),
              ("train reward_ema", *series(records, "train", "reward_ema"), "-"),
              ("eval reward_mean", *series(records, "eval", "reward_mean"), "o-"),
              ("eval task_score", *series(records, "eval", "task_score"), "s--")]
    curves = [c for c in curves if c[1]]
    if not curves:
        return False
    fig, ax = new_figure()
    for label, steps, values, style in curves:
        ax.plot(steps, values, style, label=label)
    ax.set(xlabel="PPO iteration", ylabel="reward / score", title="Step 3: reward per iteration")
    return save(fig, ax, path)


def plot_phase_times(records: list[dict], path: str) -> bool:
    """Stacked bars of each phase's seconds per iteration, the logged total as a line."""
    keys = phase_keys(records)
    if not keys:
        return False
    train = [r for r in records if r.get("kind") == "train"]
    steps, bottom = [r["step"] for r in train], [0.0] * len(train)
    fig, ax = new_figure()
    for key in keys:
        values = [float(r.get(key, 0.0)) - float(r.get(NESTED.get(key, ""), 0.0)) for r in train]
        ax.bar(steps, values, bottom=bottom, label=key[len("time_"):-len("_s")])
        bottom = [b + v for b, v in zip(bottom, values)]
    total_steps, totals = series(records, "train", TOTAL_TIME)
    if total_steps:
        ax.plot(total_steps, totals, "k.-", label="total")
    ax.set(xlabel="PPO iteration", ylabel="seconds", title="Step 3: time per phase of each iteration")
    return save(fig, ax, path)


def new_figure():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display on the machines this runs on
    import matplotlib.pyplot as plt
    return plt.subplots(figsize=(8, 4.5))


def save(fig, ax, path: str) -> bool:
    import matplotlib.pyplot as plt
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_plots(step3_dir: str) -> list[str]:
    """reward.png and phase_times.png next to step3_dir/log.jsonl; the paths of those written."""
    records = read_log(os.path.join(step3_dir, "log.jsonl"))
    plots = [(plot_rewards, "reward.png"), (plot_phase_times, "phase_times.png")]
    return [path for plot, name in plots if plot(records, path := os.path.join(step3_dir, name))]


def compare_answers(sft_path: str, ppo_path: str, prompts: list[str], max_new_tokens: int, shown: int,
                    score=None, seed: int = 1234, dtype: str = "auto") -> str:
    """Sampled answers (as PPO trains and evaluates on; greedy decoding of a small model mostly repeats one
    word) of both actors, in dtype (a --dtype value), to the first `shown` prompts, with score(prompt,
    answer), and the mean score over all prompts when score is given. Both actors sample with the same seed."""
    from transformers.utils import logging as hf_logging

    from rlhf.conversation import complete, load_actor
    hf_logging.disable_progress_bar()
    answers = {}
    for name, path in (("SFT", sft_path), ("PPO", ppo_path)):
        model, tokenizer = load_actor(path, dtype)
        answers[name] = complete(model, tokenizer, prompts, max_new_tokens, do_sample=True, seed=seed)
    lines = []
    for i, prompt in enumerate(prompts[:shown]):
        lines.append(f"prompt:{prompt}")
        for name, texts in answers.items():
            note = f" (score {score(prompt, texts[i]):+.2f})" if score else ""
            lines.append(f"  {name}: {texts[i]}{note}")
    if score:
        means = {name: sum(map(score, prompts, texts)) / len(prompts) for name, texts in answers.items()}
        lines.append(f"mean score over {len(prompts)} prompts (sampled): "
                     + ", ".join(f"{name} {m:+.3f}" for name, m in means.items()))
    return "\n".join(lines)
