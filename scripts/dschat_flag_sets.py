"""Write tests/dschat_flag_sets.json: the argument lists of DeepSpeed-Chat's training scripts, of its
e2e_rlhf.py command lines and of its steps' main.py parsers (names only), each with its source path.

    python scripts/dschat_flag_sets.py REPO [--out tests/dschat_flag_sets.json]

REPO is a git repository of DeepSpeedExamples (read with `git show`, no work tree needed). Each training
script runs under bash in an empty directory with `deepspeed` defined as a function that records its
arguments, so the lists are what bash itself expands (the script's defaults for its positional
parameters); the sweep scripts run with each argument tuple their drivers and DeepSpeed-Chat's
tests/test_training.py pass (the drivers themselves are not run: they `pkill -9 python`). Model, data,
output and TensorBoard paths become placeholders ({model}, {actor}, {critic}, {data}, {output}).
Only argument lists are kept; no script text."""
import argparse
import itertools
import json
import os
import re
import subprocess
import tempfile

APP = "applications/DeepSpeed-Chat"
PATH_FLAGS = {"--model_name_or_path": "{model}", "--actor_model_name_or_path": "{actor}",
              "--critic_model_name_or_path": "{critic}", "--data_path": "{data}", "--output_dir": "{output}",
              "--tensorboard_path": "{output}"}
STEPS = {"step1_supervised_finetuning": "sft", "step2_reward_model_finetuning": "reward",
         "step2_dpo_finetuning": "dpo", "step3_rlhf_finetuning": "ppo"}
# The argument tuples of the sweep drivers (run_step*_sweep.sh) and of tests/test_training.py, by sweep script.
ACTOR, CRITIC = "AdamG012/chat-opt-1.3b-sft-deepspeed", "AdamG012/chat-opt-350m-reward-deepspeed"
BOOLS = ("true", "false")
SWEEPS = {
    "step1_supervised_finetuning": ("run_step1_sweep.sh", [
        [z, off, lora, f"z{z}_offload_{off}_lora_{lora}"] for z in "23" for off in BOOLS for lora in BOOLS]),
    "step2_reward_model_finetuning": ("run_step2_sweep.sh", [
        [z, off, f"z{z}_offload_{off}"] for z in "23" for off in BOOLS]),
    "step2_dpo_finetuning": ("run_step2_sweep.sh", [[z, off, f"z{z}_offload_{off}"] for z in "23" for off in BOOLS]),
    "step3_rlhf_finetuning": ("run_step3_sweep.sh", [
        [ACTOR, CRITIC, z, z, he, off, lora, "false", f"z{z}_he_{he}_offload_{off}_lora_{lora}"]
        for z in "23" for he in BOOLS for off in BOOLS for lora in BOOLS] + [
        [ACTOR, CRITIC, "3", "3", he, "false", "true", "true", f"z3_he_{he}_offload_false_lora_true_mpl_true"]
        for he in BOOLS]),
}
TEST_TRAINING = [  # tests/test_training.py: facebook/opt-125m, a critic directory, test mode stopping at step 5
    ["facebook/opt-125m", "CRITIC_CKPT_DIR", z, z, he, off, lora, "false",
     f"z{z}_he_{he}_offload_{off}_lora_{lora}", "true", "5"]
    for z, he, off, lora in itertools.product("23", BOOLS, BOOLS, BOOLS)
    if not (z == "2" and he == "true" and off == "true" and lora == "false")]  # the combination it skips
CAPTURE = 'deepspeed() { python3 -c "import json, sys; print(json.dumps(sys.argv[1:]))" "$@" >> "$CAPTURE"; }'


def git_show(repo: str, path: str) -> str:
    return subprocess.run(["git", "-C", repo, "show", f"HEAD:{path}"], capture_output=True, text=True,
                          check=True).stdout


def commit(repo: str) -> str:
    return subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()


def training_scripts(repo: str) -> list[str]:
    listing = subprocess.run(["git", "-C", repo, "ls-tree", "-r", "--name-only", "HEAD", f"{APP}/training"],
                             capture_output=True, text=True, check=True).stdout.split()
    return sorted(p for p in listing if "/training_scripts/" in p and p.endswith(".sh"))


def captured_argv(script_text: str, args: list[str]) -> list[str]:
    """The argument list the script hands to `deepspeed`, run by bash in a scratch directory."""
    with tempfile.TemporaryDirectory() as cwd:
        capture = os.path.join(cwd, "argv.jsonl")
        script = os.path.join(cwd, "script.sh")
        with open(script, "w") as f:
            f.write(script_text)
        subprocess.run(["bash", "-c", f"{CAPTURE}; export -f deepspeed; bash script.sh \"$@\"", "bash", *args],
                       cwd=cwd, env={**os.environ, "CAPTURE": capture}, check=True, capture_output=True)
        with open(capture) as f:
            (argv,) = [json.loads(line) for line in f]
    return argv


def with_placeholders(flags: list[str]) -> list[str]:
    """Each path flag's values (none, when the script leaves a path empty) become one placeholder."""
    out, skipping = [], False
    for token in flags:
        if token.startswith("--"):
            skipping = token in PATH_FLAGS
            out += [token, PATH_FLAGS[token]] if skipping else [token]
        elif not skipping:
            out.append(token)
    return out


def flag_set(source: str, argv: list[str], args: list[str]) -> dict:
    """Launcher options before the script name (main.py), the script's flags after it."""
    at = argv.index("main.py")
    step = STEPS[re.search(r"training/(step[^/]+)/", source).group(1)]
    deployment = next((d for d in ("single_gpu", "single_node", "multi_node") if f"/{d}/" in source), "single_node")
    return {"source": source, "script_args": args, "step": step, "deployment": deployment,
            "launcher": argv[:at], "flags": with_placeholders(argv[at + 1:])}


def script_flag_sets(repo: str) -> list[dict]:
    sets = []
    for path in training_scripts(repo):
        step_dir = re.search(r"training/(step[^/]+)/", path).group(1)
        name = os.path.basename(path)
        if name.startswith("run_step") and name.endswith("_sweep.sh"):
            continue  # a driver: its argument tuples are in SWEEPS
        tuples = [[]]
        if name == "run_single.sh":
            tuples = SWEEPS[step_dir][1] + (TEST_TRAINING if step_dir == "step3_rlhf_finetuning" else [])
        text = git_show(repo, path)
        sets += [flag_set(path, captured_argv(text, args), args) for args in tuples]
    return sets


E2E_LINES = re.compile(r"python3? e2e_rlhf\.py([^\n`]*)")


def e2e_command_lines(repo: str) -> list[dict]:
    """e2e_rlhf.py's command lines in DeepSpeed-Chat's README and in e2e_rlhf.py's own docstring."""
    found = []
    for path in (f"{APP}/README.md", f"{APP}/e2e_rlhf.py"):
        for match in E2E_LINES.finditer(git_show(repo, path)):
            found.append({"source": path, "step": "e2e", "flags": match.group(1).split()})
    return found


ADD_ARGUMENT = re.compile(r"add_argument\(\s*['\"](--[\w-]+)['\"]")


def main_py_flags(repo: str) -> dict[str, dict]:
    """Each step's main.py flags (names only), with the four deepspeed.add_config_arguments adds."""
    deepspeed_flags = ["--deepspeed", "--deepspeed_config", "--deepscale", "--deepscale_config"]
    out = {}
    for step_dir, step in STEPS.items():
        path = f"{APP}/training/{step_dir}/main.py"
        text = git_show(repo, path)
        extra = deepspeed_flags if "add_config_arguments" in text else []
        out[step] = {"source": path, "flags": ADD_ARGUMENT.findall(text) + extra}
    return out


def one_set_per_line(data: dict) -> str:
    """JSON with each flag set (and each main.py list) on a line of its own: diffs show one set per line."""
    def items(mapping_or_list):
        pairs = mapping_or_list.items() if isinstance(mapping_or_list, dict) else enumerate(mapping_or_list)
        return ",\n".join((f"  {json.dumps(k)}: " if isinstance(mapping_or_list, dict) else "  ") + json.dumps(v)
                           for k, v in pairs)
    head = {k: v for k, v in data.items() if k not in ("main_py", "flag_sets")}
    return (json.dumps(head)[:-1] + ',\n"main_py": {\n' + items(data["main_py"]) + '\n},\n"flag_sets": [\n'
            + items(data["flag_sets"]) + "\n]}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", help="a git repository of DeepSpeedExamples")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                      "dschat_flag_sets.json"))
    args = parser.parse_args()
    data = {"repository": "https://github.com/deepspeedai/DeepSpeedExamples", "commit": commit(args.repo),
            "written_by": "scripts/dschat_flag_sets.py", "placeholders": sorted(set(PATH_FLAGS.values())),
            "main_py": main_py_flags(args.repo),
            "flag_sets": script_flag_sets(args.repo) + e2e_command_lines(args.repo)}
    with open(args.out, "w") as f:
        f.write(one_set_per_line(data))
    print(f"{len(data['flag_sets'])} flag sets -> {args.out}")


if __name__ == "__main__":
    main()
