"""LLaMA-shaped decoders: RoPE, RMSNorm, SwiGLU through packed gate/up, grouped query attention,
tied or untied embeddings, sliding-window layers. LLaMA, Qwen2/Qwen2.5, Qwen3 and Mistral share
this one graph and weight map; a family is a `Family` description of what its layers carry, not a
module of its own."""
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hybrid_engine.models.base import CausalLM
from hybrid_engine.models.layers import MLP, Attention, DecoderLayer, Norm, RotaryEmbedding, VocabParallelEmbedding
from hybrid_engine.models.weights import WeightMap, linear_entries, norm_entries, vocab_entries

# RoPE types whose frequencies are fixed for positions below max_position_embeddings (the most a
# generate call may reach), so one cos/sin table built at load time is exact. "dynamic" only
# changes its frequencies beyond that length.
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class Family:
    """How a LLaMA-shaped family differs from LLaMA. None means "as the config's attention_bias"."""
    qkv_bias: bool | None = None   # Qwen2: always biased Q/K/V projections
    out_bias: bool | None = None   # Qwen2: never a bias on o_proj
    qk_norm: bool = False          # Qwen3: RMSNorm over head_dim on each query and key head, before RoPE


def head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def attention_biases(config, family: Family) -> tuple[bool, bool]:
    """(bias on q/k/v, bias on the output projection)."""
    default = getattr(config, "attention_bias", False)
    return (default if family.qkv_bias is None else family.qkv_bias,
            default if family.out_bias is None else family.out_bias)


def sliding_window(config, index: int) -> int | None:
    """The attention window of layer `index`, None when it attends to the whole context. Mistral
    slides in every layer; Qwen2/Qwen3 name their sliding layers in layer_types."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[index] != "sliding_attention":
        return None
    return getattr(config, "sliding_window", None)


def rope_frequencies(config: LlamaConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) as transformers computes them."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"RoPE type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if rope_type != "default":
        return ROPE_INIT_FUNCTIONS[rope_type](config)
    d = head_dim(config)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d), 1.0


class LlamaForInference(CausalLM):
    config_class = LlamaConfig
    family = Family()

    def __init__(self, config: LlamaConfig, *args, **kwargs):
        if config.hidden_act != "silu":
            raise ValueError(f"{type(config).__name__} hidden_act {config.hidden_act!r} is not supported; "
                             f"supported: 'silu'")
        self.rotary = None  # built in build_layer, once the dtype is known
        super().__init__(config, *args, **kwargs)
        c, f = config, self.factory
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size, self.tp, f)
        self.final_norm = Norm(c.hidden_size, c.rms_norm_eps, True, f)
        self.lm_head = (None if c.tie_word_embeddings
                        else VocabParallelEmbedding(c.vocab_size, c.hidden_size, self.tp, f))

    def build_layer(self, index: int) -> DecoderLayer:
        c, f, tp = self.config, self.factory, self.tp
        if self.rotary is None:
            self.rotary = RotaryEmbedding(*rope_frequencies(c), c.max_position_embeddings, f)
        qk_norm_eps = c.rms_norm_eps if self.family.qk_norm else None
        attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, head_dim(c),
                         *attention_biases(c, self.family), tp, f, self.rotary, qk_norm_eps,
                         sliding_window(c, index))
        mlp = MLP(c.hidden_size, c.intermediate_size, "silu", True, getattr(c, "mlp_bias", False), tp, f)
        norms = [Norm(c.hidden_size, c.rms_norm_eps, True, f) for _ in range(2)]
        return DecoderLayer(attn, mlp, *norms, pre_norm=True)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def final(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.final_norm(h, residual)[0]

    @classmethod
    def weight_map(cls, config: LlamaConfig) -> WeightMap:
        c, e = config, config.hidden_size
        wmap: WeightMap = {**vocab_entries("embed_tokens", "model.embed_tokens", c.vocab_size, e),
                           **norm_entries("final_norm", "model.norm", e, bias=False)}
        if not c.tie_word_embeddings:
            wmap.update(vocab_entries("lm_head", "lm_head", c.vocab_size, e))
        for i in range(c.num_hidden_layers):
            wmap.update(layer_entries(c, cls.family, f"layers.{i}.", f"model.layers.{i}."))
        return wmap


class Qwen2ForInference(LlamaForInference):
    config_class = Qwen2Config
    family = Family(qkv_bias=True, out_bias=False)


class Qwen3ForInference(LlamaForInference):
    config_class = Qwen3Config
    family = Family(qk_norm=True)


class MistralForInference(LlamaForInference):
    config_class = MistralConfig


def layer_entries(c: LlamaConfig, family: Family, ours: str, hf: str) -> WeightMap:
    e, d, inter = c.hidden_size, head_dim(c), c.intermediate_size
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    attn, mlp = hf + "self_attn.", hf + "mlp."
    qkv_bias, out_bias = attention_biases(c, family)
    mlp_bias = getattr(c, "mlp_bias", False)
    wmap = {
        **linear_entries(ours + "attn.qkv", [attn + "q_proj", attn + "k_proj", attn + "v_proj"], [q, kv, kv], e,
                         "column", qkv_bias),
        **linear_entries(ours + "attn.out", [attn + "o_proj"], [e], q, "row", out_bias),
        **linear_entries(ours + "mlp.up", [mlp + "gate_proj", mlp + "up_proj"], [inter, inter], e, "column",
                         mlp_bias),
        **linear_entries(ours + "mlp.down", [mlp + "down_proj"], [e], inter, "row", mlp_bias),
        **norm_entries(ours + "attn_norm", hf + "input_layernorm", e, bias=False),
        **norm_entries(ours + "mlp_norm", hf + "post_attention_layernorm", e, bias=False),
    }
    if family.qk_norm:
        wmap.update(norm_entries(ours + "attn.q_norm", attn + "q_norm", d, bias=False))
        wmap.update(norm_entries(ours + "attn.k_norm", attn + "k_norm", d, bias=False))
    return wmap
