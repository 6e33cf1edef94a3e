"""Real model configurations (hard-coded: nothing is downloaded); benchmarks build them with random weights."""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, PretrainedConfig, PreTrainedModel

MODELS = {
    "opt-125m": lambda: OPTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                                  vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=768),
    "opt-350m": lambda: OPTConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                                  vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=512,
                                  do_layer_norm_before=False),
    "opt-1.3b": lambda: OPTConfig(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                                  vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048),
    "llama-1.1b": lambda: LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                      num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                                      max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def causal_lm(name: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A causal LM of configuration `name` with random weights, built directly in `dtype`."""
    config: PretrainedConfig = MODELS[name]()
    return AutoModelForCausalLM.from_config(config, dtype=dtype)
