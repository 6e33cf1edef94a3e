"""RLHF on top of hybrid_engine: the three InstructGPT steps on DeepSpeed with DeepSpeed-Chat's flags.

Entry points (python -m ...): rlhf.sft (step 1), rlhf.reward (step 2), rlhf.ppo (step 3: PPO, GRPO,
RLOO), rlhf.train (all three), rlhf.chat, rlhf.example (the synthetic task). Step 3 as a library:
rlhf.rollout (prompts in, answers out) and rlhf.ppo_loop (the iteration, in the order it runs).

hybrid_engine never imports this package; this package imports hybrid_engine and never bench.
"""
import os

# Transparent huge pages for CPU tensors of 2 MiB and more (read by PyTorch's CPU allocator at its first
# such allocation, so set before any): a ZeRO-3 step allocates and frees gigabytes (logits, flattened
# gradients, gathered layers), each a fresh mapping the kernel would otherwise fault in and zero 4 KiB
# at a time. OPT-125M actor + critic step, 2 ranks, fp32: 2.1M -> 0.12M page faults, system time
# 13-17 -> 7-9 s, the step 46 -> 38 s. A user's own setting (THP_MEM_ALLOC_ENABLE=0) is kept.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# Freed CPU tensors of 1 MiB and more are kept for the next step (hybrid_engine.memory.cache_cpu_blocks):
# huge pages make each fault cheaper, this makes them rare. OPT-125M actor + critic step, 2 ranks,
# fp32: 150k -> 1k page faults per step after the first, system time 10 -> 2 s, the step 39 -> 32 s,
# peak resident +14%. HE_CPU_CACHE=0 leaves PyTorch's allocator alone.
if os.environ.get("HE_CPU_CACHE", "1") != "0":
    from hybrid_engine.memory import cache_cpu_blocks

    cache_cpu_blocks()
