"""One command for the three RLHF steps (python -m rlhf.train), with the flags of DeepSpeed-Chat's
e2e_rlhf.py: step 1 (SFT, rlhf.sft) trains the actor from --actor-model, step 2 (rlhf.reward) the
reward model from --reward-model, step 3 (PPO, rlhf.ppo) both from their outputs.

Each step runs as its own process group through the deepspeed launcher (stopped with this command,
whatever stops it), its output under --output-dir in e2e_rlhf.py's layout (actor-models/NAME,
reward-models/NAME, step3-models/NAME; NAME is the size for e2e_rlhf.py's model forms, 1.3b or
facebook/opt-1.3b, else the model's last path component), its log in that folder's training.log. A step
whose finished output exists is skipped (unless --force, or an input of it was rebuilt in this run).
e2e_rlhf.py's model sizes train with the settings of the DeepSpeed-Chat script it would run for them.

    python -m rlhf.train --example                 # the synthetic task, steps 1-3 on 2 CPU ranks
    python -m rlhf.train --step 1 2 --actor-model 1.3b --reward-model 350m --deployment-type single_node \\
        --num-gpus 8 --data-path Dahoas/rm-static --step1-args "--lora_dim 128"
"""
import argparse
import glob
import hashlib
import os
import re
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hybrid_engine.distributed import free_port, remove_deepspeed_shm
from rlhf import e2e_presets
from rlhf.args import add, add_dtype, resolve_dtype
from rlhf.data.sources import DataError, check_hub_sources, hub_unreachable
from rlhf.step_process import Terminated, raise_on_sigterm, run_group

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
    """The output folders' NAME as e2e_rlhf.py names them: the size for its forms (1.3b, facebook/opt-1.3b),
    else a hub name's or a local path's last component."""
    return e2e_presets.e2e_size(model) or os.path.basename(os.path.normpath(model))


def zero_stage(value: str) -> int | None:
    """e2e_rlhf.py's --actor-zero-stage / --reward-zero-stage: 0-3, or "" (its default): the step's own."""
    if value not in ("", "0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"{value!r}: want 0, 1, 2, 3 or \"\" (the step's own stage)")
    return int(value) if value else None


def steps_of(args) -> dict[int, Step]:
    names = {1: model_name(args.actor_model), 2: model_name(args.reward_model), 3: model_name(args.actor_model)}
    return {n: Step(n, os.path.join(args.output_dir, FOLDERS[n], names[n])) for n in (1, 2, 3)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rlhf.train", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add(parser, "step", "Steps to run, any subset of 1 2 3 (run in order).", type=int, nargs="+",
        choices=(1, 2, 3), default=[1, 2, 3])
    add_models(parser)
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


def add_models(parser: argparse.ArgumentParser) -> None:
    """The base models and their ZeRO stages, in e2e_rlhf.py's forms too."""
    sizes = ("e2e_rlhf.py's sizes ({}, meaning facebook/opt-SIZE) and local directories named opt-SIZE train with "
             "the settings of the DeepSpeed-Chat script e2e_rlhf.py runs for that size (rlhf.e2e_presets; this "
             "command's flags and --stepN-args override them)")
    add(parser, "actor_model", "Base model of the actor (step 1): a hub name, a local checkpoint path or a size; "
        f"{sizes.format(', '.join(e2e_presets.ACTOR_SIZES))}. Default {DEFAULTS['actor_model']} (needs internet).")
    add(parser, "reward_model", "Base model of the reward model (step 2): a hub name, a local checkpoint path or "
        f"a size; {sizes.format(', '.join(e2e_presets.REWARD_SIZES))}. Default {DEFAULTS['reward_model']} "
        "(needs internet).")
    add(parser, "actor_zero_stage", "ZeRO stage of the actor (steps 1 and 3): 0-3, or \"\" (e2e_rlhf.py's "
        "default): the step's own (its DeepSpeed-Chat script's for a size).", type=zero_stage)
    add(parser, "reward_zero_stage", "ZeRO stage of the reward model and the critic (steps 2 and 3): 0-3, or \"\": "
        "the step's own (its DeepSpeed-Chat script's for a size).", type=zero_stage)


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


def step_model(args, n: int) -> str:
    """The model a step starts from (steps 1 and 2), or whose size picks step 3's settings (the actor's)."""
    return args.reward_model if n == 2 else args.actor_model


def step_preset(args, n: int) -> tuple[str | None, list[str]]:
    """(DeepSpeed-Chat's script, its flags) for the step's model size, as e2e_rlhf.py runs it."""
    return (None, []) if args.example else e2e_presets.preset(n, args.deployment_type, step_model(args, n))


def preset_note(args, n: int) -> str | None:
    """Which settings the step gets from DeepSpeed-Chat's scripts, said before it starts."""
    script, flags = step_preset(args, n)
    size = None if args.example else e2e_presets.size_of(step_model(args, n))
    if script:
        return f"[step {n}] settings of DeepSpeed-Chat's training/{script} (e2e_rlhf.py's script): {' '.join(flags)}"
    if size:
        return (f"[step {n}] DeepSpeed-Chat has no script for opt-{size} under {args.deployment_type} (e2e_rlhf.py "
                f"stops there): {MODULES[n]}'s own defaults")
    return None


def step_flags(args, steps: dict[int, Step], n: int) -> list[str]:
    """The step's command-line flags: its DeepSpeed-Chat script's settings, this command's, the example's, the
    zero stages given, then --stepN-args (later flags win)."""
    data = ["--data_path", *args.data_path, "--data_split", args.data_split,
            "--data_output_path", os.path.join(args.output_dir, "data_files")]
    if n == 3:
        models = ["--actor_model_name_or_path", steps[1].output_dir, "--critic_model_name_or_path",
                  steps[2].output_dir, "--enable_hybrid_engine"]
        zero = [("--actor_zero_stage", args.actor_zero_stage), ("--critic_zero_stage", args.reward_zero_stage)]
    else:
        models = ["--model_name_or_path", e2e_presets.hub_name(step_model(args, n))]
        zero = [("--zero_stage", args.actor_zero_stage if n == 1 else args.reward_zero_stage)]
    zero_flags = [str(x) for flag, stage in zero if stage is not None for x in (flag, stage)]
    outputs = ["--output_dir", steps[n].output_dir, "--tensorboard_path", steps[n].output_dir]
    return [*step_preset(args, n)[1], *data, *models, *outputs, "--dtype", args.dtype, *example_args(args, n),
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


def this_run(log_text: str) -> str:
    """The part of a step's log written by its last run (each run starts with a `=== TIME COMMAND` line)."""
    return log_text.rsplit("\n=== ", 1)[-1]


def tail(log_text: str, n: int = TAIL_LINES) -> str:
    """The last n lines, progress-bar redraws (carriage returns) reduced to their final state."""
    lines = [line.rsplit("\r", 1)[-1] if line.rstrip("\r") else line for line in log_text.splitlines()]
    return "\n".join(lines[-n:])


# rlhf.cli's `rank R: error: ...` (or `error: ...` in a world of one), argparse's `PROG: error: ...`
ERROR_LINE = re.compile(r"^(?:rank \d+: )?error: .+$|^[\w.-]+: error: .+$", re.M)
LAUNCH_CODE = re.compile(r"exits with return code = (-?\d+)")


def rank_errors(log_text: str) -> list[str]:
    """The error lines the ranks printed, each message once (every rank may report the same one)."""
    first = {}
    for line in ERROR_LINE.findall(log_text):
        first.setdefault(line.split("error: ", 1)[1], line)
    return list(first.values())


def killing_signal(code: int, log_text: str) -> str | None:
    """The signal a rank died of: deepspeed's launch.py logs the rank's return code (-N for signal N); a
    direct child returns -N, a shell 128 + N, the launcher 247 for SIGKILL (sys.exit(-9))."""
    codes = [int(c) for c in LAUNCH_CODE.findall(log_text)] + [code]
    number = next((-c for c in codes if c < 0), 9 if code in (137, 247) else None)
    return signal.Signals(number).name if number in {s.value for s in signal.Signals} else None


def what_failed(code: int, log_text: str) -> str:
    """The failing rank's own error line, else the signal it died of."""
    errors, killer = rank_errors(log_text), killing_signal(code, log_text)
    if errors:
        return "; ".join(errors[:3])
    if killer:
        return f"a rank was killed by {killer}"
    return "no rank printed an error line (the log's last lines follow)"


def failure_hint(n: int, code: int, log_text: str) -> str:
    """What to do about it, where the cause is clear: a bad flag, or memory (a rank killed by SIGKILL)."""
    if "unrecognized arguments" in log_text or "error: argument" in log_text:
        return (f"hint: a flag {MODULES[n]} does not accept or a bad value: check --step{n}-args against "
                f"`python -m {MODULES[n]} --help`.")
    if killing_signal(code, log_text) == "SIGKILL":
        return ("hint: SIGKILL is most often the kernel's OOM killer (see `dmesg`): memory ran out. A smaller "
                "per-device batch (--per_device_train_batch_size, for step 3 --per_device_generation_batch_size / "
                "--per_device_training_batch_size), LoRA (--lora_dim 8 --only_optimize_lora; step 3: "
                "--actor_lora_dim), a higher ZeRO stage (--actor-zero-stage / --reward-zero-stage 3), gradient "
                "checkpointing, or fewer ranks per node.")
    return ""


def inputs_of(args, steps: dict[int, Step], n: int) -> list[int]:
    """The earlier steps whose checkpoints step n starts from."""
    if n == 3:
        return [1, 2]
    return [1] if n == 2 and os.path.abspath(args.reward_model) == steps[1].output_dir else []


def check_checkpoint(path: str, n: int, needed_by: int) -> None:
    """A config and a tokenizer that load (a step-2 critic's is optional), with the step to run if not."""
    needs = f"step {needed_by} needs the step-{n} checkpoint {path}, which"
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise StepError(f"{needs} does not exist (no config.json): run step {n} first (this command with --step {n})")
    from transformers import AutoConfig, AutoTokenizer

    from rlhf.hf_models import has_tokenizer
    try:
        AutoConfig.from_pretrained(path)
        if n == 1 or has_tokenizer(path):  # a critic may come without one (DeepSpeed-Chat's step 2 saves none)
            AutoTokenizer.from_pretrained(path)
    except Exception as e:  # any reason a checkpoint does not load is reported the same way
        raise StepError(f"{needs} does not load ({type(e).__name__}: {e}): run step {n} again with --force") from None


def check_inputs(args, steps: dict[int, Step], n: int) -> None:
    """The earlier steps' checkpoints and the hub's reachability, before any process starts."""
    for i in inputs_of(args, steps, n):
        check_checkpoint(steps[i].output_dir, i, needed_by=n)
    try:
        check_hub_sources(args.data_path)
    except DataError as e:
        raise StepError(f"step {n} cannot read --data-path {e}") from None
    model = e2e_presets.hub_name(step_model(args, n))
    if n != 3 and not os.path.exists(model) and (reason := hub_unreachable()):
        raise StepError(f"step {n} cannot load {model}: not a local checkpoint, and {reason}. Save it where the hub "
                        "can be reached (save_pretrained of the model and its tokenizer) and pass that directory; "
                        "one named opt-SIZE keeps e2e_rlhf.py's settings for that size.")


def launch(args, step: Step, port: int) -> int:
    """Start the step's launcher and ranks and wait for them; the launcher's return code."""
    cmd = [*launcher(args, port), "--module", MODULES[step.number], *step_flags(args, steps_of(args), step.number)]
    env, label = step_env(args), f"[step {step.number}]"
    for line in (preset_note(args, step.number), f"{' '.join(f'{k}={v}' for k, v in env.items())} {shlex.join(cmd)}",
                 f"started {time.strftime('%H:%M:%S')}, log: {step.log}"):
        if line:
            print(line if line.startswith(label) else f"{label} {line}", flush=True)
    return run_group(cmd, env, step.log, args.verbose, label)


def run_step(args, step: Step) -> None:
    """Launch one step; StepError with what failed and the end of its log when it fails. Whatever ends it,
    its processes are gone and nothing half-written stays behind."""
    check_inputs(args, steps_of(args), step.number)
    os.makedirs(step.output_dir, exist_ok=True)
    port, start, started_at, code = free_port(), time.perf_counter(), time.time(), None
    try:
        code = launch(args, step, port)
    finally:  # DeepSpeed's CPU all-reduce leaves ~66 MB of /dev/shm per rank behind; other nodes' are out of reach
        if args.deployment_type != "multi_node":
            remove_deepspeed_shm(port, local_ranks(args) or os.cpu_count() or 1)
        if code != 0 or not step.finished:
            remove_partial_outputs(args, step, started_at)
    seconds = time.perf_counter() - start
    if code != 0 or not step.finished:
        raise StepError(failure(step, code, seconds))
    print(f"[step {step.number}] finished in {format_seconds(seconds)}: {step.output_dir}", flush=True)


def partial_outputs(args, step: Step, since: float) -> list[str]:
    """What a step stopped mid-way leaves half-written: save_hf's and the resumable checkpoints' temporary
    directories and the data cache's temporary files, written since it started."""
    parent, name = os.path.split(step.output_dir)
    patterns = (os.path.join(parent, f".tmp-{name}*"), os.path.join(step.output_dir, ".tmp-*"),
                os.path.join(step.output_dir, "*", ".tmp-*"), os.path.join(args.output_dir, "data_files", "*.tmp"))
    return [path for pattern in patterns for path in glob.glob(pattern) if os.path.getmtime(path) >= since]


def remove_partial_outputs(args, step: Step, since: float) -> None:
    for path in partial_outputs(args, step, since):
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        print(f"[step {step.number}] removed the half-written {path}", flush=True)


def failure(step: Step, code: int, seconds: float) -> str:
    why = f"exited with return code {code}" if code else f"exited 0 but wrote no checkpoint in {step.checkpoint}"
    log_text = this_run(Path(step.log).read_text(errors="replace"))
    hint = failure_hint(step.number, code, log_text)
    return (f"step {step.number} ({MODULES[step.number]}) {why} after {format_seconds(seconds)}: "
            f"{what_failed(code, log_text)}\nLast lines of {step.log}:\n{tail(log_text)}"
            + (f"\n{hint}" if hint else ""))


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
    raise_on_sigterm()
    try:
        run(args)
    except StepError as e:
        sys.exit(f"error: {e}")
    except (KeyboardInterrupt, Terminated) as e:
        # the step's process group was stopped on the way out (rlhf.step_process.run_group)
        print(f"interrupted ({e or 'SIGINT'}): the running step's processes were stopped", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)


if __name__ == "__main__":
    main()
