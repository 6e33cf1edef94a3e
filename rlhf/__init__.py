"""RLHF on top of hybrid_engine: the three InstructGPT steps on DeepSpeed with DeepSpeed-Chat's flags.

Entry points (python -m ...): rlhf.sft (step 1), rlhf.reward (step 2), rlhf.ppo (step 3: PPO, GRPO,
RLOO), rlhf.train (all three), rlhf.chat, rlhf.example (the synthetic task). Step 3 as a library:
rlhf.rollout (prompts in, answers out) and rlhf.ppo_loop (the iteration, in the order it runs).

hybrid_engine never imports this package; this package imports hybrid_engine and never bench.
"""
