"""Real model configurations (hard-coded: nothing is downloaded); benchmarks build them with random weights."""
import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, OPTConfig, PretrainedConfig, PreTrainedModel,
                          Qwen2Config, Qwen3Config)

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
    # Qwen/Qwen2.5-0.5B: biased Q/K/V, 14 heads over 2 KV heads, tied embeddings.
    "qwen2.5-0.5b": lambda: Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                        num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Qwen/Qwen3-0.6B: per-head q/k RMSNorm, head_dim 128 (16 x 128 = 2048 != hidden 1024), tied embeddings.
    "qwen3-0.6b": lambda: Qwen3Config(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                                      num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                                      max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # mistralai/Mistral-7B-v0.1: GQA 32/8, sliding-window attention over 4096 tokens.
    "mistral-7b": lambda: MistralConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                        num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                                        max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
                                        tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}

def causal_lm(name: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A causal LM of configuration `name` with random weights, built directly in `dtype`."""
    config: PretrainedConfig = MODELS[name]()
    return AutoModelForCausalLM.from_config(config, dtype=dtype)
