"""DeepSpeed plumbing shared by the RLHF steps: distributed init, the engine config, AdamW groups,
the schedule, LoRA, and Hugging Face checkpoints gathered from any ZeRO stage."""
import os
import shutil
import tempfile
import time

import deepspeed
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, get_scheduler, set_seed

from hybrid_engine.distributed import free_port
from rlhf.data import build_datasets
from rlhf.log import Log

DROPOUT_ATTRS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "attn_pdrop",
                 "resid_pdrop", "embd_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")


def init_distributed() -> torch.device:
    """gloo on CPUs, NCCL on GPUs; a plain `python -m` run becomes a world of one."""
    if "RANK" not in os.environ:  # not started by deepspeed/torchrun: no MPI discovery, a free port
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    if not cuda:
        return torch.device("cpu")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", int(os.environ["LOCAL_RANK"]))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


# ZeRO-3's gathered-parameter limits, in parameters. With DeepSpeed's defaults (1e9 live, reuse distance
# 1e9) a layer of a 1B model that will be used again (its backward) stays gathered until then. Measured,
# step 3's first iteration at OPT-1.3B (LoRA, 2 ranks): 11.5 GB per rank with the defaults, 10.3 with
# these. The live and prefetch limits are DeepSpeed-Chat's.
ZERO3_LIMITS = {"stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 3e7,
                "stage3_max_reuse_distance": 3e7}


def ds_config(args, world: int) -> dict:
    """The engine config for --zero_stage, --dtype, --offload, micro batch and accumulation."""
    zero = {"stage": args.zero_stage, "stage3_param_persistence_threshold": 1e4, **ZERO3_LIMITS}
    if args.offload and torch.cuda.is_available():  # on a CPU everything already lives in host memory
        zero["offload_optimizer"] = {"device": "cpu"}
        if args.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    micro = args.per_device_train_batch_size
    # torch_adam: DeepSpeed's fused Adam is a CUDA kernel; the CPU uses torch.optim.AdamW
    adam = {"lr": args.learning_rate, "betas": [0.9, 0.95], "torch_adam": not torch.cuda.is_available()}
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "train_batch_size": micro * args.gradient_accumulation_steps * world, "gradient_clipping": 1.0,
            "steps_per_print": 10**9, "zero_optimization": zero, "optimizer": {"type": "AdamW", "params": adam},
            "bf16": {"enabled": args.dtype == "bf16"}, "fp16": {"enabled": args.dtype == "fp16"}}


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


def no_decay_names(model: nn.Module) -> set[str]:
    """Biases and the weights of norm layers (LayerNorm, RMSNorm...): decaying a scale towards 0 is wrong."""
    names = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if name == "bias" or "norm" in type(module).__name__.lower():
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def param_groups(model: nn.Module, weight_decay: float, lora_learning_rate: float) -> list[dict]:
    """DeepSpeed-Chat's grouping: decayed weights, LoRA weights at their own learning rate, no-decay."""
    skip = no_decay_names(model)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trained if n not in skip and not is_adapter_param(n)],
               "weight_decay": weight_decay},
              {"params": [p for n, p in trained if n not in skip and is_adapter_param(n)],
               "weight_decay": weight_decay, "lr": lora_learning_rate},
              {"params": [p for n, p in trained if n in skip], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def configure_dropout(config: PretrainedConfig, dropout: float | None) -> PretrainedConfig:
    for attr in DROPOUT_ATTRS if dropout is not None else ():
        if hasattr(config, attr):
            setattr(config, attr, dropout)
    return config


def load_config(path: str, dropout: float | None = None, max_seq_len: int | None = None) -> PretrainedConfig:
    """The model's config, with clear errors for a missing model or a sequence longer than its positions."""
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--model_name_or_path {path!r}: no model config there ({e})") from None
    if max_seq_len:
        check_positions(config, path, "model", "--max_seq_len", max_seq_len)
    return configure_dropout(config, dropout)


def check_positions(config: PretrainedConfig, path: str, role: str, flags: str, length: int) -> None:
    """A clear error before training for sequences longer than the model has positions for."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and length > positions:
        raise ValueError(f"{flags} = {length} exceeds the {role}'s max_position_embeddings {positions} ({path})")


def apply_lora(model: PreTrainedModel, lora_dim: int, module_name: str, only_optimize_lora: bool) -> PreTrainedModel:
    """PEFT LoRA on every linear layer whose name contains module_name; the model keeps its own class
    (the adapters are injected in place), so HybridEngine and save_hf see transformers names."""
    targets = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and module_name in n]
    if not targets:
        raise ValueError(f"--lora_module_name {module_name!r} matches no linear layer of the model")
    # alpha = r: scale 1, as DeepSpeed-Chat's LoRA layers
    model = get_peft_model(model, LoraConfig(r=lora_dim, lora_alpha=lora_dim, target_modules=targets)).get_base_model()
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_param(name) or not only_optimize_lora)
    return model


def prepare_model(model: PreTrainedModel, args) -> PreTrainedModel:
    """LoRA and gradient checkpointing as the flags ask."""
    if args.lora_dim > 0:
        model = apply_lora(model, args.lora_dim, args.lora_module_name, args.only_optimize_lora)
    if args.gradient_checkpointing:
        # non-reentrant: works when the inputs of a frozen (LoRA-only) model do not require grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_engine(model: PreTrainedModel, args, num_training_steps: int):
    """A DeepSpeed engine with AdamW groups and a warm-up schedule stepped at each optimizer step."""
    def schedule(optimizer):
        return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                             num_training_steps=num_training_steps)
    groups = param_groups(model, args.weight_decay, args.lora_learning_rate)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, lr_scheduler=schedule,
                                      config=ds_config(args, world_size()))
    return engine


def merged_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A full copy of the weights under transformers names, LoRA merged (W + scale * B @ A by PEFT's
    get_delta_weight); the training weights are not touched. Every rank must call it under ZeRO-3."""
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=any(hasattr(p, "ds_id") for p in params)):
        state = {k.replace(".base_layer.", "."): v.detach().clone()
                 for k, v in module.state_dict().items() if not is_adapter_param(k)}
        for name, layer in module.named_modules():
            for adapter in layer.active_adapters if isinstance(layer, LoraLayer) else ():
                w = state[f"{name}.weight"]
                state[f"{name}.weight"] = (w.float() + layer.get_delta_weight(adapter).float()).to(w.dtype)
    return state


def save_hf(engine_or_model, tokenizer, out_dir: str) -> None:
    """save_pretrained of the plain model (gathered, LoRA merged) and the tokenizer, written by rank 0
    to a temporary directory renamed into place, so a crash never leaves half a checkpoint."""
    module = getattr(engine_or_model, "module", engine_or_model)
    state = merged_state(module)
    if rank() == 0:
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        plain = type(module)._from_config(module.config, dtype=dtype)
        plain.load_state_dict(state)
        plain.tie_weights()
        parent = os.path.dirname(os.path.abspath(out_dir))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-" + os.path.basename(out_dir))
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        keep = [f for f in os.listdir(out_dir)] if os.path.isdir(out_dir) else []
        for name in keep:  # logs and other files already in out_dir stay
            if not os.path.exists(os.path.join(tmp, name)):
                shutil.move(os.path.join(out_dir, name), tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()


def make_loader(dataset, batch_size: int, collate, shuffle: bool, seed: int) -> DataLoader:
    """Each rank reads its own share; eval shares are padded by repeating a few records."""
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate)


def steps_per_run(loader: DataLoader, args) -> int:
    """Optimizer steps of the whole run (the schedule's length); refuses a run with none."""
    steps = len(loader) * args.num_train_epochs // args.gradient_accumulation_steps
    if steps == 0:
        raise ValueError(f"no optimizer step: {len(loader.dataset)} training records per run, "
                         f"--per_device_train_batch_size {args.per_device_train_batch_size} x "
                         f"--gradient_accumulation_steps {args.gradient_accumulation_steps} x {world_size()} ranks")
    return steps


def all_reduce(values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    """Reduce scalars over ranks in one all-reduce."""
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


def all_sum(*values: float) -> list[float]:
    return all_reduce(list(values))


def all_max(value: float) -> float:
    return all_reduce([value], dist.ReduceOp.MAX)[0]


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def train_micro(engine, loss_fn, batch: dict) -> tuple[float, int, bool]:
    """Forward and backward of one micro batch; the engine steps the optimizer at accumulation boundaries
    (counted over the whole run, so a window may span two epochs)."""
    batch = to_device(batch, engine.device)
    boundary = engine.is_gradient_accumulation_boundary()  # asked before step(), which advances the count
    loss = loss_fn(engine.module, batch)
    engine.backward(loss)
    engine.step()
    return loss.item(), int(batch["attention_mask"].sum()), boundary


def run_training(engine, loader: DataLoader, loss_fn, evaluate, log, args) -> None:
    """Epochs of micro batches; loss_fn(module, batch) -> loss. Evaluates before training, after each
    epoch and every --eval_interval optimizer steps; logs every optimizer step."""
    log.eval(0, evaluate())
    step, loss_sum, tokens, start = 0, 0.0, 0, time.perf_counter()
    for epoch in range(args.num_train_epochs):
        loader.sampler.set_epoch(epoch)
        for micro, batch in enumerate(loader, 1):
            loss, n, boundary = train_micro(engine, loss_fn, batch)
            loss_sum, tokens = loss_sum + loss, tokens + n
            if args.print_loss:
                print(f"rank {rank()} epoch {epoch} micro {micro} loss {loss:.4f}", flush=True)
            if boundary:
                step += 1
                total_loss, total_tokens = all_sum(loss_sum, tokens)
                log.step(step, total_loss / (args.gradient_accumulation_steps * world_size()), engine.get_lr()[0],
                         int(total_tokens), time.perf_counter() - start)
                loss_sum, tokens, start = 0.0, 0, time.perf_counter()
                if args.eval_interval and step % args.eval_interval == 0:
                    log.eval(step, evaluate())
        log.eval(step, evaluate())


def load_run(args, stage: int):
    """Distributed init, seed, config, tokenizer and the stage's (train, eval) datasets."""
    device = init_distributed()
    set_seed(args.seed)
    config = load_config(args.model_name_or_path, args.dropout, args.max_seq_len)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    train, evalset = build_datasets(args.data_path, args.data_split, stage, tokenizer, seed=args.seed,
                                    max_seq_len=args.max_seq_len, output_path=args.data_output_path,
                                    sft_only_data_path=args.sft_only_data_path if stage == 1 else ())
    return device, config, tokenizer, train, evalset


def train_and_save(args, model: PreTrainedModel, tokenizer, datasets: tuple, collate, loss_fn, evaluate,
                   desc: str) -> None:
    """The run both steps share: loaders, engine, epochs with evals, then the HF checkpoint.
    evaluate(engine, eval_loader, eval_iters) -> metrics."""
    train_loader = make_loader(datasets[0], args.per_device_train_batch_size, collate, True, args.seed)
    eval_loader = make_loader(datasets[1], args.per_device_eval_batch_size, collate, False, args.seed)
    steps = steps_per_run(train_loader, args)
    engine = build_engine(prepare_model(model, args), args, steps)
    log = Log(args.output_dir, steps, rank(), args.tensorboard_path if args.enable_tensorboard else None, desc)
    run_training(engine, train_loader, loss_fn, lambda: evaluate(engine, eval_loader, args.eval_iters), log, args)
    save_hf(engine, tokenizer, args.output_dir)
    log.close()
