"""Inference graphs (OPT, LLaMA) over the paged KV cache, built from `transformers` models."""
from hybrid_engine.models.base import CausalLM
from hybrid_engine.models.layers import AttentionBatch, TensorParallel
from hybrid_engine.models.llama import LlamaForInference
from hybrid_engine.models.opt import OPTForInference
from hybrid_engine.models.registry import MODELS, from_hf, model_class
from hybrid_engine.models.weights import WeightMap, WeightSource

__all__ = ["CausalLM", "AttentionBatch", "TensorParallel", "OPTForInference", "LlamaForInference", "MODELS",
           "from_hf", "model_class", "WeightMap", "WeightSource"]
