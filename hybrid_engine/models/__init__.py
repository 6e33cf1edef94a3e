"""Inference graphs (OPT, LLaMA) over the paged KV cache, built from `transformers` models."""
from hybrid_engine.models.base import CausalLM
from hybrid_engine.models.layers import AttentionBatch, TensorParallel
from hybrid_engine.models.llama import LlamaForInference
from hybrid_engine.models.opt import OPTForInference
from hybrid_engine.models.registry import MODELS, empty_model, from_hf, model_class, weight_map
from hybrid_engine.models.weights import WeightMap, WeightSource, load_weights, packed_shape

__all__ = ["CausalLM", "AttentionBatch", "TensorParallel", "OPTForInference", "LlamaForInference", "MODELS",
           "from_hf", "empty_model", "model_class", "weight_map", "WeightMap", "WeightSource", "load_weights",
           "packed_shape"]
