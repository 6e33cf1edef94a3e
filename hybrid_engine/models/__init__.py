"""Inference graphs over the paged KV cache, built from `transformers` models: OPT, and the
LLaMA-shaped families (LLaMA, Qwen2/Qwen2.5, Qwen3, Mistral)."""
from hybrid_engine.models.base import CausalLM
from hybrid_engine.models.layers import AttentionBatch, TensorParallel
from hybrid_engine.models.llama import (LlamaForInference, MistralForInference, Qwen2ForInference,
                                         Qwen3ForInference)
from hybrid_engine.models.opt import OPTForInference
from hybrid_engine.models.registry import MODELS, empty_model, from_hf, model_class, weight_map
from hybrid_engine.models.weights import WeightMap, WeightSource, load_weights, packed_shape

__all__ = ["CausalLM", "AttentionBatch", "TensorParallel", "OPTForInference", "LlamaForInference",
           "Qwen2ForInference", "Qwen3ForInference", "MistralForInference", "MODELS", "from_hf", "empty_model",
           "model_class", "weight_map", "WeightMap", "WeightSource", "load_weights", "packed_shape"]
