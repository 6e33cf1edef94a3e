"""Which inference model serves which `transformers` configuration. Anything else is an error:
never a silent fallback to slow generation."""
import torch
from torch import nn

from hybrid_engine.models.base import CausalLM
from hybrid_engine.models.llama import (LlamaForInference, MistralForInference, Qwen2ForInference,
                                         Qwen3ForInference)
from hybrid_engine.models.opt import OPTForInference
from hybrid_engine.models.weights import WeightMap

MODELS: dict[type, type[CausalLM]] = {cls.config_class: cls for cls in (
    OPTForInference, LlamaForInference, Qwen2ForInference, Qwen3ForInference, MistralForInference)}


def model_class(config) -> type[CausalLM]:
    """The inference model for a config (exact class match: a subclass may change the graph)."""
    cls = MODELS.get(type(config))
    if cls is None:
        supported = ", ".join(f"{c.__name__} ({c.model_type})" for c in MODELS)
        raise ValueError(f"unsupported architecture {type(config).__name__} "
                         f"({getattr(config, 'model_type', '?')}); supported: {supported}")
    return cls


def empty_model(config, tp_rank: int = 0, tp_size: int = 1, tp_group=None, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> CausalLM:
    """Uninitialised inference weights of this rank, to be filled in place (e.g. by the resharder)
    through `model.state_dict()`, whose keys are those of `weight_map(config)`."""
    return model_class(config)(config, tp_rank, tp_size, tp_group, dtype, device)


def weight_map(config) -> WeightMap:
    return model_class(config).weight_map(config)


def from_hf(model: nn.Module | dict, config=None, *, dtype: torch.dtype | None = None, tp_rank: int = 0,
            tp_size: int = 1, tp_group=None, device: torch.device | str | None = None) -> CausalLM:
    """Build the inference model for a `transformers` causal LM (or state dict + config)."""
    config = config if config is not None else model.config
    return model_class(config).from_hf(model, config, dtype=dtype, tp_rank=tp_rank, tp_size=tp_size,
                                       tp_group=tp_group, device=device)
