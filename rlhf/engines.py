"""DeepSpeed engines of the trained models: the config for --zero_stage, --dtype, --offload, micro
batch and accumulation; AdamW groups as DeepSpeed-Chat groups them; the warm-up schedule."""
import deepspeed
import torch
from torch import nn
from transformers import PreTrainedModel, get_scheduler

from hybrid_engine.lora import is_adapter_param
from rlhf.distributed import world_size


# ZeRO-3's gathered-parameter limits, in parameters. With DeepSpeed's defaults (1e9 live, reuse distance
# 1e9) a layer of a 1B model that will be used again (its backward) stays gathered until then. Measured,
# step 3's first iteration at OPT-1.3B (LoRA, 2 ranks): 11.5 GB per rank with the defaults, 10.3 with
# these. The live and prefetch limits are DeepSpeed-Chat's.
ZERO3_LIMITS = {"stage3_max_live_parameters": 3e7, "stage3_prefetch_bucket_size": 3e7,
                "stage3_max_reuse_distance": 3e7}


def ds_config(args, world: int) -> dict:
    """The engine config for --zero_stage, --dtype, --offload, micro batch and accumulation."""
    zero = {"stage": args.zero_stage, "stage3_param_persistence_threshold": 1e4, **ZERO3_LIMITS}
    offload = args.offload and torch.cuda.is_available()  # on a CPU everything already lives in host memory
    if offload:
        zero["offload_optimizer"] = {"device": "cpu"}
        if args.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    micro = args.per_device_train_batch_size
    # torch's fused AdamW on the CPU and on GPUs alike: DeepSpeed's FusedAdam is built with nvcc at the first run and
    # fails on arch lists such as TORCH_CUDA_ARCH_LIST=9.0a; offloaded optimizer states keep DeepSpeed's CPU Adam
    adam = {"lr": args.learning_rate, "betas": [0.9, 0.95], **({} if offload else {"torch_adam": True, "fused": True})}
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "train_batch_size": micro * args.gradient_accumulation_steps * world, "gradient_clipping": 1.0,
            "steps_per_print": 10**9, "zero_optimization": zero, "optimizer": {"type": "AdamW", "params": adam},
            "bf16": {"enabled": args.dtype == "bf16"}, "fp16": {"enabled": args.dtype == "fp16"}}


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


def build_engine(model: PreTrainedModel, args, num_training_steps: int):
    """A DeepSpeed engine with AdamW groups and a warm-up schedule stepped at each optimizer step."""
    def schedule(optimizer):
        return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps,
                             num_training_steps=num_training_steps)
    groups = param_groups(model, args.weight_decay, args.lora_learning_rate)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, lr_scheduler=schedule,
                                      config=ds_config(args, world_size()))
    return engine
