"""Step 3's command line: DeepSpeed-Chat's step-3 flags (underscore and dashed spellings) and ours,
the checks made before any model is loaded, and the run lengths they imply."""
import argparse

from transformers import SchedulerType

from rlhf.args import DATA_HELP, DEFAULT_DATA, add, add_dschat_common, add_dtype, add_no_effect, note_no_effect, \
    resolve_dtype


def add_data(parser: argparse.ArgumentParser) -> None:
    add(parser, "data_path", DATA_HELP + " Step 3 reads the prompts of its part.", nargs="+", default=DEFAULT_DATA)
    add(parser, "data_split", "Proportions of each source for steps 1,2,3; this step takes part 3.", default="2,4,4")
    add(parser, "data_output_path", "Directory of the tokenized-data cache.", default="/tmp/data_files/")
    add(parser, "unsupervised_dataset_name", "Plain text for the PTX term: a .txt/.json/.jsonl file or directory "
        "of them (records with a \"text\" field), or a hub dataset (needs internet). Off when not given.")
    add(parser, "unsupervised_dataset_config_name", "Config of a hub dataset given by --unsupervised_dataset_name.")
    add(parser, "unsup_coef", "Weight of the PTX language-model loss (gamma of InstructGPT's eq. 2).",
        type=float, default=27.8)
    add(parser, "max_prompt_seq_len", "Longest prompt in tokens; longer prompts are dropped and counted.",
        type=int, default=256)
    add(parser, "max_answer_seq_len", "Most new tokens per answer.", type=int, default=256)
    add(parser, "min_answer_seq_len", "Fewest new tokens per answer: EOS cannot end an answer earlier "
        "(benchmarks force every answer to --max_answer_seq_len with it).", type=int, default=0)


def add_models(parser: argparse.ArgumentParser) -> None:
    add(parser, "actor_model_name_or_path", "Step-1 output (the SFT actor; also the frozen reference).", required=True)
    add(parser, "critic_model_name_or_path", "Step-2 output (the reward model; the critic starts from it): ours "
        "or a DeepSpeed-Chat step-2 directory (pytorch_model.bin + config.json).", required=True)
    add_no_effect(parser, "num_padding_at_beginning", "the last real token is found from the attention mask.",
                  type=int, default=1)
    add(parser, "output_dir", "Where actor/, critic/, actor_ema/, checkpoints/ and log.jsonl go.", required=True)
    add(parser, "seed", "Seed of the data order, initialisation and sampling.", type=int, default=1234)
    add(parser, "local_rank", "Set by the deepspeed launcher; torchrun sets LOCAL_RANK instead.", type=int, default=-1)
    add_no_effect(parser, "preprocessing_num_workers", "tokenization is cached per data version.", type=int)


def add_batches(parser: argparse.ArgumentParser) -> None:
    add(parser, "per_device_generation_batch_size", "Prompts per rank per generation batch.", type=int, default=16)
    add(parser, "per_device_training_batch_size", "Experience rows per rank per PPO mini-batch (and PTX blocks "
        "per step).", type=int, default=16)
    add(parser, "generation_batches", "Generation batches collected before training on them.", type=int, default=1)
    add(parser, "ppo_epochs", "Passes over the collected experience.", type=int, default=1)
    add(parser, "num_train_epochs", "Passes over the prompts.", type=int, default=1)
    add(parser, "gradient_accumulation_steps", "Mini-batches per optimizer step.", type=int, default=1)
    add(parser, "max_steps", "Stop after this many iterations (0: run every epoch).", type=int, default=0)


def add_optim(parser: argparse.ArgumentParser) -> None:
    for role, lr in (("actor", 9.65e-6), ("critic", 5e-6)):
        add(parser, f"{role}_learning_rate", f"Initial {role} learning rate (after warm-up).", type=float, default=lr)
        add(parser, f"{role}_weight_decay", f"{role} AdamW weight decay.", type=float, default=0.0)
        add(parser, f"{role}_zero_stage", f"DeepSpeed ZeRO stage of the {role} (the "
            f"{'reference and EMA' if role == 'actor' else 'reward model'} follow it under stage 3).",
            type=int, default=0, choices=[0, 1, 2, 3])
        add(parser, f"{role}_gradient_checkpointing", f"Recompute {role} activations in the backward pass.",
            action="store_true")
        add(parser, f"{role}_dropout", f"Override the {role} config's dropout (default: keep it).", type=float)
        add(parser, f"{role}_lora_dim", f"LoRA rank of the {role} (0: train every weight).", type=int, default=0)
        add(parser, f"{role}_lora_module_name", f"{role} LoRA goes on linear layers whose name contains this.",
            default="decoder.layers.")
        add(parser, f"{role}_lora_learning_rate", f"Learning rate of the {role}'s LoRA weights.", type=float,
            default=5e-4)
    add(parser, "only_optimize_lora", "Freeze every non-LoRA weight of the LoRA models.", action="store_true")
    add(parser, "lr_scheduler_type", "Learning-rate schedule (transformers.get_scheduler).", default="cosine",
        choices=[s.value for s in SchedulerType])
    add(parser, "num_warmup_steps", "Linear warm-up optimizer steps.", type=int, default=100)
    add_dtype(parser, "Training and inference dtype")
    add(parser, "offload", "ZeRO offload of optimizer state and parameters (CUDA only; on the CPU everything "
        "already lives in host memory).", action="store_true")
    for name in ("offload_reference_model", "offload_reward_model"):
        add_no_effect(parser, name, "on the CPU every model lives in host memory; under ZeRO-3 the frozen models "
                      "are partitioned like their trained twins.", action="store_true")


OLD_LOGPROBS_FROM = ("auto", "generation", "training")


def add_hybrid(parser: argparse.ArgumentParser) -> None:
    add(parser, "enable_hybrid_engine", "Generate with hybrid_engine.HybridEngine (resharded tensor-parallel "
        "weights, paged KV cache, fused kernels), and score with the frozen reference and reward model in its "
        "inference layout at --inference_tp_size (packed sequences, no ZeRO-3 gathers); off: transformers' "
        "generate on the DeepSpeed module and DeepSpeed engines for the frozen models.",
        action="store_true")
    add(parser, "inference_tp_size", "Tensor-parallel ranks per generation group (divides the world size and "
        "the attention heads); needs --enable_hybrid_engine.", type=int, default=1)
    add(parser, "old_logprobs_from", "Where the actor's log-probabilities of its answers (PPO's old logprobs) "
        "come from: 'generation' records each token's as HybridEngine samples it (no forward of the actor in "
        "the experience phase); 'training' runs the training model on the padded batch, as DeepSpeed-Chat does; "
        "'auto' (default): generation with --enable_hybrid_engine in fp32 (the two agree within 2e-5), else "
        "training (in bf16/fp16 the two forwards round differently, which would move the first epoch's ratios "
        "off 1). 'generation' needs --enable_hybrid_engine.",
        choices=OLD_LOGPROBS_FROM, default="auto")
    add_no_effect(parser, "unpin_actor_parameters", "no parameter is pinned for generation.", action="store_true")
    add_no_effect(parser, "release_inference_cache", "the inference weights and KV cache are always given back "
                  "before training.", action="store_true")
    add_no_effect(parser, "tp_gather_partition_size", "weights are resharded from the ZeRO-3 shards without "
                  "gathering layers.", type=int, default=8)
    add_no_effect(parser, "enable_mixed_precision_lora", "the inference weights are built in --dtype with LoRA "
                  "merged.", action="store_true")


def add_ppo(parser: argparse.ArgumentParser) -> None:
    add(parser, "temperature", "Sampling temperature of the answers.", type=float, default=1.0)
    add(parser, "top_p", "Nucleus sampling mass (1: off).", type=float, default=1.0)
    add(parser, "top_k", "Top-k sampling (0: off).", type=int, default=0)
    add(parser, "do_sample", "Sample the answers (default; DeepSpeed-Chat decodes greedily by accident of its "
        "defaults, which leaves PPO nothing to explore). --no-do_sample: greedy.",
        action=argparse.BooleanOptionalAction, default=True)
    add(parser, "kl_ctl", "Per-token KL penalty coefficient against the reference.", type=float, default=0.1)
    add(parser, "clip_reward_value", "Reward-model scores are clipped to [-v, v].", type=float, default=5.0)
    add(parser, "cliprange", "PPO ratio clipping of the actor loss.", type=float, default=0.2)
    add(parser, "cliprange_value", "Value clipping of the critic loss.", type=float, default=0.2)
    add(parser, "gamma", "GAE discount.", type=float, default=1.0)
    add(parser, "lam", "GAE lambda.", type=float, default=0.95)
    add(parser, "whiten_advantages", "Normalise advantages per mini-batch (DeepSpeed-Chat does not).",
        action="store_true")
    add(parser, "normalize_reward", "Divide scores by their running standard deviation (DeepSpeed-Chat does not).",
        action="store_true")
    add(parser, "enable_ema", "Keep an EMA of the actor, in fp32 (saved to output_dir/actor_ema).",
        action="store_true")
    add(parser, "ema_beta", "EMA decay per actor step.", type=float, default=0.992)


def add_algorithm(parser: argparse.ArgumentParser) -> None:
    add(parser, "algorithm", "ppo: actor and critic (DeepSpeed-Chat's step 3). grpo / rloo: no critic; G answers "
        "per prompt, each answer's advantage from its group's scores (GRPO: (r - mean) / std; RLOO: r - mean of "
        "the other G - 1), KL to the reference as a loss term (--kl_coef) instead of in the reward.",
        choices=["ppo", "grpo", "rloo"], default="ppo")
    add(parser, "num_samples_per_prompt", "Answers per prompt (G); default 8 for grpo/rloo, 1 for ppo. The group "
        "shares its prompt's KV cache blocks during generation.", type=int)
    add(parser, "kl_coef", "grpo/rloo: weight of the k3 KL-to-reference loss term.", type=float, default=0.04)
    add(parser, "scale_by_std", "grpo: divide advantages by the group's standard deviation (--no-scale_by_std: "
        "Dr. GRPO).", action=argparse.BooleanOptionalAction, default=True)
    add(parser, "loss_averaging", "grpo/rloo: average the loss over all answer tokens of the batch (token) or per "
        "answer, then over answers (sequence, the GRPO paper's).", choices=["token", "sequence"], default="token")
    add(parser, "drop_zero_std_groups", "grpo/rloo: leave out groups whose answers all scored alike (their "
        "advantages are 0; counted as frac_reward_zero_std either way).", action="store_true")


def add_run(parser: argparse.ArgumentParser) -> None:
    add(parser, "save_steps", "Write a resumable checkpoint every N iterations (0: never).", type=int, default=0)
    add(parser, "resume_from", "Resume from a checkpoint directory, or `auto`: the latest in --output_dir.")
    add(parser, "eval_interval", "Score answers to held-out prompts every N iterations (and before and after "
        "training; 0: before and after only).", type=int, default=0)
    add(parser, "eval_prompts", "Held-out prompts per evaluation (all ranks together).", type=int, default=64)
    add(parser, "eval_metric", "Also score eval answers with a rule, `module:function(prompt, answer) -> float` "
        "(e.g. rlhf.example:score for the synthetic task).")
    add(parser, "enable_tensorboard", "Write TensorBoard scalars.", action="store_true")
    add(parser, "tensorboard_path", "TensorBoard log directory.", default="step3_tensorboard")
    add(parser, "print_answers", "Print a prompt and its answer during training.", action="store_true")
    add(parser, "print_answers_interval", "With --print_answers, every N iterations.", type=int, default=1)
    add(parser, "enable_test_mode", "Stop at --test_stop_step (DeepSpeed-Chat's name for --max_steps).",
        action="store_true")
    add(parser, "test_stop_step", "With --enable_test_mode: the iteration to stop at.", type=int, default=0)
    add_no_effect(parser, "compute_fp32_loss", "losses are always computed in fp32.", action="store_true")
    add_no_effect(parser, "align_overflow", "there is no loss scaling in bf16 or fp32.", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Step 3 of RLHF: PPO (DeepSpeed-Chat's step-3 flags).")
    for add_group in (add_data, add_models, add_batches, add_optim, add_hybrid, add_ppo, add_algorithm, add_run,
                      add_dschat_common):
        add_group(parser)
    return parser


POSITIVE = ("per_device_generation_batch_size", "per_device_training_batch_size", "generation_batches",
            "ppo_epochs", "num_train_epochs", "gradient_accumulation_steps", "max_prompt_seq_len",
            "max_answer_seq_len", "inference_tp_size", "eval_prompts", "print_answers_interval")


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot work before any model is loaded; name the no-effect flags given."""
    note_no_effect(args)
    for name in POSITIVE:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    resolve_dtype(args)
    if args.inference_tp_size > 1 and not args.enable_hybrid_engine:
        raise ValueError("--inference_tp_size > 1 needs --enable_hybrid_engine")
    if args.old_logprobs_from == "generation" and not args.enable_hybrid_engine:
        raise ValueError("--old_logprobs_from generation needs --enable_hybrid_engine (it records them as it samples)")
    if args.old_logprobs_from == "auto":
        args.old_logprobs_from = "generation" if args.enable_hybrid_engine and args.dtype == "fp32" else "training"
    if not 0 <= args.min_answer_seq_len <= args.max_answer_seq_len:
        raise ValueError(f"--min_answer_seq_len must be in [0, --max_answer_seq_len], got {args.min_answer_seq_len}")
    if args.only_optimize_lora and args.actor_lora_dim <= 0 and args.critic_lora_dim <= 0:
        raise ValueError("--only_optimize_lora needs --actor_lora_dim or --critic_lora_dim > 0")
    if args.temperature <= 0 and args.do_sample:
        raise ValueError(f"--temperature must be > 0 when sampling, got {args.temperature}")
    if args.enable_test_mode:
        args.max_steps = args.test_stop_step
    args.num_samples_per_prompt = samples_per_prompt(args.algorithm, args.num_samples_per_prompt,
                                                     "--num_samples_per_prompt")


def samples_per_prompt(algorithm: str, given: int | None, flag: str) -> int:
    """Answers per prompt (G): by default 8 for grpo/rloo, whose baseline is the group, and 1 for ppo."""
    least = 1 if algorithm == "ppo" else 2
    samples = (1 if algorithm == "ppo" else 8) if given is None else given
    if samples < least:
        raise ValueError(f"{flag} must be >= {least} for --algorithm {algorithm}, got {samples}")
    return samples


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    check_args(args)
    return args


def minibatches(args: argparse.Namespace) -> int:
    """PPO mini-batches per generation batch: its G answers per prompt in --per_device_training_batch_size rows."""
    rows = args.per_device_generation_batch_size * args.num_samples_per_prompt
    return -(-rows // args.per_device_training_batch_size)


def iterations(args, batches_per_epoch: int) -> int:
    """Iterations of the whole run: every --generation_batches prompt batches, capped by --max_steps."""
    total = batches_per_epoch // args.generation_batches * args.num_train_epochs
    return min(total, args.max_steps) if args.max_steps else total


def steps_per_role(args, batches_per_epoch: int, ptx: bool) -> dict[str, int]:
    """Optimizer steps of the whole run, the schedules' length (the actor also steps on PTX)."""
    calls = iterations(args, batches_per_epoch) * args.generation_batches * args.ppo_epochs * minibatches(args)
    critic = max(1, calls // args.gradient_accumulation_steps)
    return {"actor": critic * (2 if ptx else 1), "critic": critic}
