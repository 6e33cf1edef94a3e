"""What DeepSpeed-Chat's e2e_rlhf.py does with a model size: `--actor-model 1.3b` (or facebook/opt-1.3b)
means facebook/opt-1.3b, its outputs go to actor-models/1.3b, and each step runs with the settings of the
training script e2e_rlhf.py would run, training/step*/training_scripts/opt/DEPLOYMENT/run_SIZE.sh
(learning rates, batch sizes, epochs, ZeRO stages, LoRA, gradient checkpointing...).

SCRIPT_FLAGS holds each such script's flags without its paths (model, data, output, TensorBoard), which
rlhf.train sets itself; the ZeRO stages are the scripts' defaults, the ones e2e_rlhf.py's
`--actor-zero-stage ""` means. tests/test_rlhf_dschat.py checks every entry against the script's own
argument list (tests/dschat_flag_sets.json). A local checkpoint whose directory is named opt-SIZE gets
the same settings, so a downloaded copy of facebook/opt-1.3b trains as the hub name would."""
import os
import re

ACTOR_SIZES = ("1.3b", "6.7b", "13b", "66b")  # e2e_rlhf.py's --actor-model choices
REWARD_SIZES = ("350m",)                      # and its --reward-model choices
E2E_NAME = re.compile(r"(?:facebook/opt-)?(\d+(?:\.\d+)?[mb])")  # what e2e_rlhf.py accepts: 1.3b, facebook/opt-1.3b
LOCAL_NAME = re.compile(r"opt-(\d+(?:\.\d+)?[mb])")
STEP_DIRS = {1: "step1_supervised_finetuning", 2: "step2_reward_model_finetuning", 3: "step3_rlhf_finetuning"}

_STEP1 = ("--data_split 2,4,4 --per_device_train_batch_size {batch} --per_device_eval_batch_size {batch} "
          "--max_seq_len 512 --learning_rate {lr} --weight_decay {decay} --num_train_epochs {epochs} "
          "--gradient_accumulation_steps 1 --lr_scheduler_type cosine --num_warmup_steps 0 --seed 1234")
_STEP3 = ("--data_split 2,4,4 --num_padding_at_beginning 1 --per_device_generation_batch_size {batch} "
          "--per_device_training_batch_size {batch} --generation_batches 1 --ppo_epochs 1 --max_answer_seq_len 256 "
          "--max_prompt_seq_len 256 --actor_learning_rate {lr} --critic_learning_rate 5e-6")
_LORA = "--lora_dim 128 --lora_module_name decoder.layers."
_ACTOR_LORA = "--actor_lora_dim 128 --actor_lora_module_name decoder.layers."
_RUN3 = "--num_train_epochs 1 --lr_scheduler_type cosine --gradient_accumulation_steps 1"

SCRIPT_FLAGS = {
    "step1_supervised_finetuning/training_scripts/opt/single_gpu/run_1.3b.sh":
        "--gradient_accumulation_steps 8 --lora_dim 128 --zero_stage 0 --enable_tensorboard --deepspeed",
    "step1_supervised_finetuning/training_scripts/opt/single_node/run_1.3b.sh":
        _STEP1.format(batch=8, lr="9.65e-6", decay="0.", epochs=16)
        + " --zero_stage 2 --deepspeed --enable_tensorboard",
    "step1_supervised_finetuning/training_scripts/opt/single_node/run_6.7b.sh":
        _STEP1.format(batch=6, lr="9.65e-6", decay="0.", epochs=16)
        + " --gradient_checkpointing --zero_stage 3 --deepspeed",
    "step1_supervised_finetuning/training_scripts/opt/single_node/run_13b.sh":
        _STEP1.format(batch=4, lr="1e-4", decay="0.", epochs=16)
        + f" --gradient_checkpointing --zero_stage 3 {_LORA} --deepspeed",
    "step1_supervised_finetuning/training_scripts/opt/multi_node/run_66b.sh":
        _STEP1.format(batch=4, lr="1e-4", decay="0.1", epochs=2)
        + f" --gradient_checkpointing --zero_stage 3 {_LORA} --deepspeed",
    "step2_reward_model_finetuning/training_scripts/opt/single_gpu/run_350m.sh":
        "--num_padding_at_beginning 1 --weight_decay 0.1 --dropout 0.0 --gradient_accumulation_steps 4 --zero_stage 0 "
        "--enable_tensorboard --deepspeed",
    "step2_reward_model_finetuning/training_scripts/opt/single_node/run_350m.sh":
        "--data_split 2,4,4 --num_padding_at_beginning 1 --per_device_train_batch_size 4 "
        "--per_device_eval_batch_size 4 --max_seq_len 512 --learning_rate 5e-5 --weight_decay 0.1 "
        "--num_train_epochs 1 --dropout 0.0 "
        "--gradient_accumulation_steps 1 --lr_scheduler_type cosine --num_warmup_steps 0 --seed 1234 --zero_stage 0 "
        "--deepspeed",
    "step2_reward_model_finetuning/training_scripts/opt/multi_node/run_350m.sh":
        "--data_split 2,4,4 --num_padding_at_beginning 1 --per_device_train_batch_size 2 "
        "--per_device_eval_batch_size 2 --max_seq_len 512 --learning_rate 5e-5 --weight_decay 0.1 --dropout 0.0 "
        "--num_train_epochs 1 "
        "--gradient_accumulation_steps 1 --lr_scheduler_type cosine --num_warmup_steps 0 --seed 1234 --zero_stage 0 "
        "--deepspeed",
    "step3_rlhf_finetuning/training_scripts/opt/single_gpu/run_1.3b.sh":
        "--actor_zero_stage 0 --critic_zero_stage 0 --num_padding_at_beginning 1 --gradient_accumulation_steps 2 "
        "--deepspeed --actor_lora_dim 128 --enable_hybrid_engine --actor_gradient_checkpointing --actor_dropout 0.0",
    "step3_rlhf_finetuning/training_scripts/opt/single_node/run_1.3b.sh":
        _STEP3.format(batch=4, lr="9.65e-6") + f" {_RUN3} --actor_dropout 0.0 --num_warmup_steps 100 --deepspeed "
        "--seed 1234 --enable_hybrid_engine --actor_zero_stage 2 --critic_zero_stage 2 --enable_ema "
        "--enable_tensorboard",
    "step3_rlhf_finetuning/training_scripts/opt/single_node/run_6.7b.sh":
        _STEP3.format(batch=4, lr="9.65e-6") + " --actor_weight_decay 0.1 --critic_weight_decay 0.1 "
        f"{_RUN3} --actor_gradient_checkpointing --actor_dropout 0.0 --num_warmup_steps 100 --deepspeed --seed 1234 "
        "--enable_hybrid_engine --actor_zero_stage 3 --critic_zero_stage 3",
    "step3_rlhf_finetuning/training_scripts/opt/single_node/run_13b.sh":
        _STEP3.format(batch=16, lr="5e-4") + f" {_RUN3} --num_warmup_steps 100 --deepspeed --seed 1234 "
        "--enable_hybrid_engine --inference_tp_size 2 --actor_zero_stage 3 --critic_zero_stage 3 "
        f"--actor_gradient_checkpointing --actor_dropout 0.0 {_ACTOR_LORA}",
    "step3_rlhf_finetuning/training_scripts/opt/multi_node/run_66b.sh":
        _STEP3.format(batch=4, lr="5e-4") + " --actor_weight_decay 0.1 --critic_weight_decay 0.1 "
        f"{_RUN3} --num_warmup_steps 100 --deepspeed --seed 1234 --enable_hybrid_engine --inference_tp_size 8 "
        "--tp_gather_partition_size 4 --actor_zero_stage 3 --critic_zero_stage 3 --actor_gradient_checkpointing "
        f"--actor_dropout 0.0 {_ACTOR_LORA}",
}


def e2e_size(model: str) -> str | None:
    """The size e2e_rlhf.py's --actor-model / --reward-model value names (1.3b, facebook/opt-1.3b), else None."""
    match = E2E_NAME.fullmatch(model)
    return match.group(1) if match else None


def hub_name(model: str) -> str:
    """e2e_rlhf.py's sizes as the hub names they stand for; anything else (a path, a hub name) as it is."""
    size = e2e_size(model)
    return f"facebook/opt-{size}" if size else model


def size_of(model: str) -> str | None:
    """The OPT size whose script settings apply: e2e_rlhf.py's forms, or a path ending in opt-SIZE."""
    match = LOCAL_NAME.fullmatch(os.path.basename(os.path.normpath(model)))
    return e2e_size(model) or (match.group(1) if match else None)


def script_of(step: int, deployment: str, size: str) -> str:
    """The script e2e_rlhf.py runs for the step (relative to DeepSpeed-Chat's training/ directory)."""
    return f"{STEP_DIRS[step]}/training_scripts/opt/{deployment}/run_{size}.sh"


def preset(step: int, deployment: str, model: str) -> tuple[str | None, list[str]]:
    """(the script, its flags) for a step's model, or (None, []) when DeepSpeed-Chat has no such script."""
    size = size_of(model)
    script = script_of(step, deployment, size) if size else None
    return (script, SCRIPT_FLAGS[script].split()) if script in SCRIPT_FLAGS else (None, [])
