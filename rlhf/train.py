"""One command for the three RLHF steps (python -m rlhf.train), with the flags of DeepSpeed-Chat's
e2e_rlhf.py: step 1 (SFT, rlhf.sft) trains the actor from --actor-model, step 2 (rlhf.reward) the
reward model from --reward-model, step 3 (PPO, rlhf.ppo) both from their outputs.

Each step runs as its own process through the deepspeed launcher, its output under --output-dir in
DeepSpeed-Chat's layout (actor-models/NAME, reward-models/NAME, step3-models/NAME, NAME being the
model's last path component), its log in that folder's training.log. A step whose finished output
exists is skipped (unless --force, or an input of it was rebuilt in this run).

    python -m rlhf.train --example                 # the synthetic task, steps 1-3 on 2 CPU ranks
    python -m rlhf.train --step 1 2 --actor-model facebook/opt-1.3b --reward-model facebook/opt-350m \\
        --deployment-type single_node --num-gpus 8 --data-path Dahoas/rm-static --step1-args "--lora_dim 128"
"""
import argparse
import hashlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hybrid_engine.distributed import free_port, remove_deepspeed_shm
from rlhf.args import add, add_dtype, resolve_dtype

MODULES = {1: "rlhf.sft", 2: "rlhf.reward", 3: "rlhf.ppo"}
FOLDERS = {1: "actor-models", 2: "reward-models", 3: "step3-models"}
DEFAULTS = {"actor_model": "facebook/opt-1.3b", "reward_model": "facebook/opt-350m",
            "data_path": ["Dahoas/rm-static"]}  # DeepSpeed-Chat's, for machines with internet access
TAIL_LINES = 20

# --example: the synthetic task of rlhf.example on 2 CPU ranks. Steps 1-2 as in tests/test_rlhf_functional.py;
# measured here (small OPT, 20000 records): SFT eval perplexity 118 -> 35 (~45 s of training), reward model
# from the SFT actor 46% -> 90.5% held-out pairwise accuracy (~75 s).
EXAMPLE_RANKS = 2
EXAMPLE_STEP1_ARGS = ["--max_seq_len", "64", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size",
                      "64", "--learning_rate", "3e-3", "--num_train_epochs", "2"]
EXAMPLE_STEP2_ARGS = ["--max_seq_len", "64", "--per_device_train_batch_size", "16", "--per_device_eval_batch_size",
                      "64", "--learning_rate", "2e-3", "--num_train_epochs", "1"]
# Step 3 of the example: every PPO setting in one place (the whole example must finish within 15 minutes on
# 2 vCPUs). Answers of at most 12 tokens: the task's longest good answer is 12 words, and a reward model that
# never saw longer ones must not be asked to judge them (it rewards length past the rule's limit).
EXAMPLE_STEP3_ARGS = ["--max_prompt_seq_len", "16", "--max_answer_seq_len", "12",
                      "--per_device_generation_batch_size", "16", "--per_device_training_batch_size", "16",
                      "--actor_learning_rate", "5e-4", "--critic_learning_rate", "1e-3", "--lr_scheduler_type",
                      "constant", "--num_warmup_steps", "0", "--whiten_advantages", "--actor_zero_stage", "3",
                      "--critic_zero_stage", "3", "--max_steps", "120", "--eval_interval", "20",
                      "--eval_prompts", "200", "--eval_metric", "rlhf.example:score"]
EXAMPLE_ANSWERS = {"shown": 4, "scored": 64, "max_new_tokens": 16}  # the SFT vs PPO comparison after step 3


class StepError(RuntimeError):
    """A step cannot run or failed; the message says what to do."""


@dataclass
class Step:
    number: int
    output_dir: str

    @property
    def checkpoint(self) -> str:
        """The directory whose config.json marks the step finished (written last, by a rename)."""
        return os.path.join(self.output_dir, "actor") if self.number == 3 else self.output_dir

    @property
    def finished(self) -> bool:
        return os.path.isfile(os.path.join(self.checkpoint, "config.json"))

    @property
    def log(self) -> str:
        return os.path.join(self.output_dir, "training.log")


def model_name(model: str) -> str:
    """The output folders' NAME: a hub name's or a local path's last component (facebook/opt-1.3b -> opt-1.3b)."""
    return os.path.basename(os.path.normpath(model))


def steps_of(args) -> dict[int, Step]:
    names = {1: model_name(args.actor_model), 2: model_name(args.reward_model), 3: model_name(args.actor_model)}
    return {n: Step(n, os.path.join(args.output_dir, FOLDERS[n], names[n])) for n in (1, 2, 3)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlhf.train", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add(parser, "step", "Steps to run, any subset of 1 2 3 (run in order).", type=int, nargs="+",
        choices=(1, 2, 3), default=[1, 2, 3])
    add(parser, "actor_model", "Base model of the actor (step 1): a hub name or a local checkpoint path. "
        f"Default {DEFAULTS['actor_model']} (needs internet).")
    add(parser, "reward_model", "Base model of the reward model (step 2): a hub name or a local checkpoint "
        f"path. Default {DEFAULTS['reward_model']} (needs internet).")
    add(parser, "actor_zero_stage", "ZeRO stage of the actor (steps 1 and 3); default: the step's own.",
        type=int, choices=(0, 1, 2, 3))
    add(parser, "reward_zero_stage", "ZeRO stage of the reward model and the critic (steps 2 and 3); "
        "default: the step's own.", type=int, choices=(0, 1, 2, 3))
    add(parser, "output_dir", "Root of the outputs: actor-models/NAME, reward-models/NAME, step3-models/NAME.",
        type=os.path.abspath, default="./output")
    add_launcher(parser)
    add(parser, "data_path", f"Data sources of all steps (see python -m rlhf.sft --help). Default "
        f"{DEFAULTS['data_path'][0]} (needs internet).", nargs="+")
    add(parser, "data_split", "Share of each source for steps 1,2,3; the same for every step so that their "
        "parts do not overlap.", default="2,4,4")
    for n, flag in ((1, "--lora_dim 8"), (2, "--learning_rate 1e-4"), (3, "--actor_lora_dim 8")):
        add(parser, f"step{n}_args", f"More flags for {MODULES[n]} as one string, e.g. \"{flag}\" (a single flag "
            f"without a value needs the = form: --step{n}-args=--print_loss); they come last, so they override "
            f"this command's (python -m {MODULES[n]} --help lists them).", default="")
    add_dtype(parser, "Dtype of every step (passed to each as --dtype; --stepN-args can override it)")
    add(parser, "force", "Run the requested steps even when their finished output exists.", action="store_true")
    add(parser, "verbose", "Also stream each step's output here (it always goes to the step's training.log).",
        action="store_true")
    add(parser, "example", "Build the synthetic topic-words task (rlhf.example) under OUTPUT_DIR/example and run "
        f"the steps on it with settings for a 2-vCPU machine, on {EXAMPLE_RANKS} ranks (--num-gpus to change). "
        "Its base model is random, so the reward model starts from the SFT actor (step 2 after step 1).",
        action="store_true")
    add(parser, "example_size", "Base model of --example: tiny (~0.12M parameters, tests) or small (~1.2M).",
        choices=("tiny", "small"), default="small")
    add(parser, "example_records", "Preference records of --example (10%% held out for eval).", type=int,
        default=20000)
    return parser


def add_launcher(parser: argparse.ArgumentParser) -> None:
    """Where the ranks run: passed to the deepspeed launcher."""
    add(parser, "deployment_type", "single_gpu (default; single_node with --example): one rank; single_node: "
        "--num-gpus ranks on this machine (default: the launcher's count of local devices; CPU processes here); "
        "multi_node: the hosts of --hostfile.",
        choices=("single_gpu", "single_node", "multi_node"))
    add(parser, "num_gpus", "Ranks per node, passed to the deepspeed launcher (--num_gpus); on a CPU machine, "
        "CPU processes.", type=int)
    add(parser, "num_nodes", "Nodes to use from the hostfile (multi_node), passed to the launcher.", type=int)
    add(parser, "hostfile", "DeepSpeed hostfile (multi_node), passed to the launcher (its default: /job/hostfile).")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.deployment_type is None:
        args.deployment_type = "single_node" if args.example else "single_gpu"
        if args.example and args.num_gpus is None:
            args.num_gpus = EXAMPLE_RANKS
    if args.deployment_type == "single_gpu" and (args.num_gpus or 1) != 1:
        parser.error(f"--num-gpus {args.num_gpus} needs --deployment-type single_node or multi_node")
    if args.deployment_type != "multi_node" and (args.hostfile or args.num_nodes):
        parser.error("--hostfile and --num-nodes need --deployment-type multi_node")
    if args.example:
        if args.actor_model or args.reward_model or args.data_path:
            parser.error("--example builds its own models and data: drop --actor-model, --reward-model, --data-path")
        prepare_example(args)
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    resolve_dtype(args)
    return args


def prepare_example(args: argparse.Namespace) -> None:
    """Write the task's data and base model once, and point the run at them."""
    from rlhf import example
    root = os.path.join(args.output_dir, "example")
    data, base = os.path.join(root, f"data-{args.example_records}"), os.path.join(root, f"opt-{args.example_size}")
    if not os.path.isfile(os.path.join(data, "eval.json")):
        example.write_data(data, args.example_records, seed=1234)
    if not os.path.isfile(os.path.join(base, "config.json")):
        example.write_model(base, args.example_size, seed=1234)
    # The reward model starts from the SFT actor: the random base model knows nothing of the language
    # (DeepSpeed-Chat's start from a pretrained model), and the reward model learns far better from it.
    args.actor_model, args.reward_model = base, os.path.join(args.output_dir, FOLDERS[1], model_name(base))
    args.data_path = [data]


def example_args(args, n: int) -> list[str]:
    return ({1: EXAMPLE_STEP1_ARGS, 2: EXAMPLE_STEP2_ARGS, 3: EXAMPLE_STEP3_ARGS}[n] if args.example else [])


def step_flags(args, steps: dict[int, Step], n: int) -> list[str]:
    """The step's command-line flags: this command's, the example's, the zero stages, then --stepN-args."""
    data = ["--data_path", *args.data_path, "--data_split", args.data_split,
            "--data_output_path", os.path.join(args.output_dir, "data_files")]
    if n == 3:
        models = ["--actor_model_name_or_path", steps[1].output_dir, "--critic_model_name_or_path",
                  steps[2].output_dir, "--enable_hybrid_engine"]
        zero = [("--actor_zero_stage", args.actor_zero_stage), ("--critic_zero_stage", args.reward_zero_stage)]
    else:
        models = ["--model_name_or_path", args.actor_model if n == 1 else args.reward_model]
        zero = [("--zero_stage", args.actor_zero_stage if n == 1 else args.reward_zero_stage)]
    zero_flags = [str(x) for flag, stage in zero if stage is not None for x in (flag, stage)]
    return [*data, *models, "--output_dir", steps[n].output_dir, "--dtype", args.dtype, *example_args(args, n),
            *zero_flags, *shlex.split(getattr(args, f"step{n}_args"))]


def launcher(args, port: int) -> list[str]:
    """The deepspeed launcher (it runs CPU ranks over gloo too, with --module; checked on DeepSpeed 0.19).
    A free --master_port, not its fixed 29500, so that two runs on one machine do not collide."""
    runner = Path(sys.executable).with_name("deepspeed")
    cmd = [str(runner)] if runner.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]
    cmd += ["--master_port", str(port)]
    if args.deployment_type == "single_gpu":
        cmd += ["--num_gpus", "1"]
    elif args.num_gpus:
        cmd += ["--num_gpus", str(args.num_gpus)]
    if args.hostfile:
        cmd += ["--hostfile", args.hostfile]
    if args.num_nodes:
        cmd += ["--num_nodes", str(args.num_nodes)]
    return cmd


def local_ranks(args) -> int | None:
    """Ranks per node, None when the launcher counts the devices."""
    return 1 if args.deployment_type == "single_gpu" else args.num_gpus


def step_env(args) -> dict[str, str]:
    """Settings for the ranks, unless already set: OpenMP spin-waiting makes small matrix products up to 50x
    slower on a small shared CPU, ranks * threads should not exceed the cores, and DeepSpeed's JIT-built
    CPU ops get a directory of this Python environment's own."""
    defaults = {"OMP_WAIT_POLICY": "PASSIVE",
                "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // (local_ranks(args) or 1))),
                "TORCH_EXTENSIONS_DIR": extensions_dir()}
    return {name: os.environ.get(name, value) for name, value in defaults.items()}


def extensions_dir() -> str:
    """torch's default build directory of JIT extensions (~/.cache/torch_extensions/py311_cpu) is shared by
    every Python environment of the user. DeepSpeed builds its CPU communication op there on the first
    launch; two environments with different include paths then rebuild it in turn, over a minute each on
    2 vCPUs (seen here). One directory per environment (sys.prefix) builds it once."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    env = hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    return os.path.join(cache, "torch_extensions", f"py{sys.version_info.major}{sys.version_info.minor}_env-{env}")


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def run_logged(cmd: list[str], env: dict[str, str], log_path: str, verbose: bool) -> int:
    """Run cmd with stdout and stderr appended to log_path (and echoed when verbose); its return code."""
    with open(log_path, "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            while chunk := os.read(proc.stdout.fileno(), 1 << 16):
                log.write(chunk)
                if verbose:
                    sys.stdout.buffer.write(chunk)
                    sys.stdout.flush()
        finally:
            code = proc.wait()  # on Ctrl-C the launcher got the SIGINT too and stops its ranks
    return code


def tail(path: str, n: int = TAIL_LINES) -> str:
    """The last n lines, progress-bar redraws (carriage returns) reduced to their final state."""
    text = Path(path).read_bytes().decode(errors="replace")
    lines = [line.rsplit("\r", 1)[-1] if line.rstrip("\r") else line for line in text.splitlines()]
    return "\n".join(lines[-n:])


def killed(code: int, log_text: str) -> bool:
    """SIGKILL (most often the kernel's OOM killer): -9 for a direct child, 137 through a shell, 247
    through the deepspeed launcher (sys.exit(-9)), which also logs its rank's return code."""
    return code in (-9, 137, 247) or "exits with return code = -9" in log_text


def failure_hint(n: int, code: int, log_text: str) -> str:
    """What most likely went wrong: a bad flag, or memory (the OOM killer, or the common causes)."""
    if "unrecognized arguments" in log_text or "error: argument" in log_text:
        return (f"hint: a flag {MODULES[n]} does not accept or a bad value: check --step{n}-args against "
                f"`python -m {MODULES[n]} --help`.")
    hints = []
    if killed(code, log_text):
        hints.append(f"return code {code}: a rank was killed by SIGKILL (-9; 137 from a shell, 247 through the "
                     f"deepspeed launcher), most often by the OOM killer (see `dmesg`): memory ran out.")
    hints.append("Out of memory? A smaller per-device batch (--per_device_train_batch_size, for step 3 "
                 "--per_device_generation_batch_size / --per_device_training_batch_size), LoRA (--lora_dim 8 "
                 "--only_optimize_lora; step 3: --actor_lora_dim), a higher ZeRO stage (--actor-zero-stage / "
                 "--reward-zero-stage 3), gradient checkpointing, or fewer ranks per node.")
    return "\n".join("hint: " + h for h in hints)


def inputs_of(args, steps: dict[int, Step], n: int) -> list[int]:
    """The earlier steps whose checkpoints step n starts from."""
    if n == 3:
        return [1, 2]
    return [1] if n == 2 and os.path.abspath(args.reward_model) == steps[1].output_dir else []


def check_checkpoint(path: str, n: int, needed_by: int) -> None:
    """A config and a tokenizer that load, with the step to run if not."""
    needs = f"step {needed_by} needs the step-{n} checkpoint {path}, which"
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise StepError(f"{needs} does not exist (no config.json): run step {n} first (this command with --step {n})")
    from transformers import AutoConfig, AutoTokenizer
    try:
        AutoConfig.from_pretrained(path)
        AutoTokenizer.from_pretrained(path)
    except Exception as e:  # any reason a checkpoint does not load is reported the same way
        raise StepError(f"{needs} does not load ({type(e).__name__}: {e}): run step {n} again with --force") from None


def check_inputs(args, steps: dict[int, Step], n: int) -> None:
    for i in inputs_of(args, steps, n):
        check_checkpoint(steps[i].output_dir, i, needed_by=n)


def run_step(args, step: Step) -> None:
    """Launch one step; StepError with the end of its log when it fails."""
    steps, port = steps_of(args), free_port()
    check_inputs(args, steps, step.number)
    os.makedirs(step.output_dir, exist_ok=True)
    cmd = [*launcher(args, port), "--module", MODULES[step.number], *step_flags(args, steps, step.number)]
    env = step_env(args)
    print(f"[step {step.number}] {' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(cmd)}", flush=True)
    print(f"[step {step.number}] started {time.strftime('%H:%M:%S')}, log: {step.log}", flush=True)
    start = time.perf_counter()
    try:
        code = run_logged(cmd, env, step.log, args.verbose)
    finally:  # DeepSpeed's CPU all-reduce leaves ~66 MB of /dev/shm per rank behind; other nodes' are out of reach
        if args.deployment_type != "multi_node":
            remove_deepspeed_shm(port, local_ranks(args) or os.cpu_count() or 1)
    seconds = time.perf_counter() - start
    if code != 0 or not step.finished:
        raise StepError(failure(step, code, seconds))
    print(f"[step {step.number}] finished in {format_seconds(seconds)}: {step.output_dir}", flush=True)


def failure(step: Step, code: int, seconds: float) -> str:
    why = f"exited with return code {code}" if code else f"exited 0 but wrote no checkpoint in {step.checkpoint}"
    hint = failure_hint(step.number, code, Path(step.log).read_text(errors="replace"))
    return (f"step {step.number} ({MODULES[step.number]}) {why} after {format_seconds(seconds)}. "
            f"Last lines of {step.log}:\n{tail(step.log)}\n{hint}")


def skip_reason(args, steps: dict[int, Step], n: int, rebuilt: set[int]) -> str | None:
    step = steps[n]
    if args.force or not step.finished or rebuilt & set(inputs_of(args, steps, n)):
        return None
    return f"[step {step.number}] skipped: finished output exists in {step.output_dir} (--force to run it again)"


def report(args, steps: dict[int, Step]) -> None:
    """After step 3: the reward curve, the plots, and for the example the SFT and PPO actors' answers."""
    from rlhf import report as step3_report
    out = steps[3].output_dir
    if not os.path.isfile(os.path.join(out, "log.jsonl")):
        print(f"no log.jsonl in {out}: no reward curve to show")
        return
    print("reward curve (step 3):\n" + step3_report.reward_table(step3_report.read_log(os.path.join(out, "log.jsonl"))))
    for path in step3_report.write_plots(out):
        print(f"plot: {path}")
    if args.example:
        from rlhf import example
        prompts = example_prompts(args.data_path[0], EXAMPLE_ANSWERS["scored"])
        print(step3_report.compare_answers(steps[1].output_dir, steps[3].checkpoint, prompts,
                                           EXAMPLE_ANSWERS["max_new_tokens"], EXAMPLE_ANSWERS["shown"], example.score,
                                           dtype=args.dtype))


def example_prompts(data_dir: str, n: int) -> list[str]:
    import json
    with open(os.path.join(data_dir, "eval.json")) as f:
        return [record["prompt"] for record in json.load(f)[:n]]


def run(args) -> None:
    steps, rebuilt, start = steps_of(args), set(), time.perf_counter()
    wanted = sorted(set(args.step))
    for n in wanted:
        reason = skip_reason(args, steps, n, rebuilt)
        if reason:
            print(reason, flush=True)
            continue
        run_step(args, steps[n])
        rebuilt.add(n)
    print(f"total: {format_seconds(time.perf_counter() - start)}, steps run: "
          f"{' '.join(map(str, sorted(rebuilt))) or 'none'}", flush=True)
    if 3 in wanted and steps[3].finished:
        report(args, steps)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except StepError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
