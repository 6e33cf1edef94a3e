"""LLaMA (and checkpoints in its layout): RoPE, RMSNorm, SwiGLU through packed gate/up, grouped
query attention, tied or untied embeddings."""
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from hybrid_engine.models.base import CausalLM
from hybrid_engine.models.layers import MLP, Attention, DecoderLayer, Embedding, Linear, Norm, RotaryEmbedding
from hybrid_engine.models.weights import WeightMap, linear_entries, norm_entries, replicated

# RoPE types whose frequencies are fixed for positions below max_position_embeddings (the most a
# generate call may reach), so one cos/sin table built at load time is exact. "dynamic" only
# changes its frequencies beyond that length.
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def head_dim(config: LlamaConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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

    def __init__(self, config: LlamaConfig, *args, **kwargs):
        if config.hidden_act != "silu":
            raise ValueError(f"LLaMA hidden_act {config.hidden_act!r} is not supported; supported: 'silu'")
        self.rotary = None  # built in build_layer, once the dtype is known
        super().__init__(config, *args, **kwargs)
        c, f = config, self.factory
        self.embed_tokens = Embedding(c.vocab_size, c.hidden_size, f)
        self.final_norm = Norm(c.hidden_size, c.rms_norm_eps, True, f)
        self.lm_head = None if c.tie_word_embeddings else Linear(c.hidden_size, c.vocab_size, False, f)

    def build_layer(self, index: int) -> DecoderLayer:
        c, f, tp = self.config, self.factory, self.tp
        if self.rotary is None:
            self.rotary = RotaryEmbedding(*rope_frequencies(c), c.max_position_embeddings, f)
        attn = Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, head_dim(c), c.attention_bias,
                         c.attention_bias, tp, f, self.rotary)
        mlp = MLP(c.hidden_size, c.intermediate_size, "silu", True, c.mlp_bias, tp, f)
        norms = [Norm(c.hidden_size, c.rms_norm_eps, True, f) for _ in range(2)]
        return DecoderLayer(attn, mlp, *norms, pre_norm=True)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def final(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.final_norm(h, residual)[0]

    @classmethod
    def weight_map(cls, config: LlamaConfig) -> WeightMap:
        c, e = config, config.hidden_size
        wmap: WeightMap = {"embed_tokens.weight": replicated("model.embed_tokens.weight", c.vocab_size, e),
                           **norm_entries("final_norm", "model.norm", e, bias=False)}
        if not c.tie_word_embeddings:
            wmap["lm_head.weight"] = replicated("lm_head.weight", c.vocab_size, e)
        for i in range(c.num_hidden_layers):
            wmap.update(llama_layer_entries(c, f"layers.{i}.", f"model.layers.{i}."))
        return wmap


def llama_layer_entries(c: LlamaConfig, ours: str, hf: str) -> WeightMap:
    e, d, inter = c.hidden_size, head_dim(c), c.intermediate_size
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    attn, mlp = hf + "self_attn.", hf + "mlp."
    return {
        **linear_entries(ours + "attn.qkv", [attn + "q_proj", attn + "k_proj", attn + "v_proj"], [q, kv, kv], e,
                         "column", c.attention_bias),
        **linear_entries(ours + "attn.out", [attn + "o_proj"], [e], q, "row", c.attention_bias),
        **linear_entries(ours + "mlp.up", [mlp + "gate_proj", mlp + "up_proj"], [inter, inter], e, "column",
                         c.mlp_bias),
        **linear_entries(ours + "mlp.down", [mlp + "down_proj"], [e], inter, "row", c.mlp_bias),
        **norm_entries(ours + "attn_norm", hf + "input_layernorm", e, bias=False),
        **norm_entries(ours + "mlp_norm", hf + "post_attention_layernorm", e, bias=False),
    }
