"""OPT (facebook/opt-*): learned positions with an offset of 2, LayerNorm before (most sizes) or
after (opt-350m) each block, ReLU MLP, optional word_embed_proj_dim projections, tied LM head."""
import torch
from transformers import OPTConfig

from hybrid_engine.models.base import CausalLM
from hybrid_engine.models.layers import MLP, Attention, DecoderLayer, Embedding, Linear, Norm, VocabParallelEmbedding
from hybrid_engine.models.weights import WeightMap, linear_entries, norm_entries, replicated, vocab_entries

# transformers' ACT2FN names -> hybrid_engine.kernels activations
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "silu": "silu", "swish": "silu"}
POSITION_OFFSET = 2  # OPT's learned position table starts at index 2 (fairseq's padding convention)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which transformers' OPT uses


def has_projections(config: OPTConfig) -> bool:
    return config.word_embed_proj_dim != config.hidden_size


def has_final_norm(config: OPTConfig) -> bool:
    return config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)


class OPTForInference(CausalLM):
    config_class = OPTConfig

    def __init__(self, config: OPTConfig, *args, **kwargs):
        if config.activation_function not in ACTIVATIONS:
            raise ValueError(f"OPT activation_function {config.activation_function!r} is not supported; "
                             f"supported: {sorted(ACTIVATIONS)}")
        if not config.layer_norm_elementwise_affine:
            raise ValueError("OPT with layer_norm_elementwise_affine=False is not supported")
        super().__init__(config, *args, **kwargs)
        c, f = config, self.factory
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.word_embed_proj_dim, self.tp, f)
        self.embed_positions = Embedding(c.max_position_embeddings + POSITION_OFFSET, c.hidden_size, f)
        self.project_in = Linear(c.word_embed_proj_dim, c.hidden_size, False, f) if has_projections(c) else None
        self.project_out = Linear(c.hidden_size, c.word_embed_proj_dim, False, f) if has_projections(c) else None
        self.final_norm = Norm(c.hidden_size, LAYER_NORM_EPS, False, f) if has_final_norm(c) else None
        self.lm_head = (None if c.tie_word_embeddings
                        else VocabParallelEmbedding(c.vocab_size, c.word_embed_proj_dim, self.tp, f))

    def build_layer(self, index: int) -> DecoderLayer:
        c, f, tp = self.config, self.factory, self.tp
        attn = Attention(c.hidden_size, c.num_attention_heads, c.num_attention_heads,
                         c.hidden_size // c.num_attention_heads, c.enable_bias, c.enable_bias, tp, f)
        mlp = MLP(c.hidden_size, c.ffn_dim, ACTIVATIONS[c.activation_function], False, c.enable_bias, tp, f)
        norms = [Norm(c.hidden_size, LAYER_NORM_EPS, False, f) for _ in range(2)]
        return DecoderLayer(attn, mlp, *norms, pre_norm=c.do_layer_norm_before)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        return h + self.embed_positions(positions + POSITION_OFFSET)

    def final(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if self.final_norm is not None:
            h, _ = self.final_norm(h, residual)
        elif residual is not None:
            h = h + residual
        return self.project_out(h) if self.project_out is not None else h

    @classmethod
    def weight_map(cls, config: OPTConfig) -> WeightMap:
        c, e, p, w = config, config.hidden_size, "model.decoder.", config.word_embed_proj_dim
        wmap: WeightMap = {
            **vocab_entries("embed_tokens", p + "embed_tokens", c.vocab_size, w),
            "embed_positions.weight": replicated(p + "embed_positions.weight",
                                                 c.max_position_embeddings + POSITION_OFFSET, e),
        }
        if has_projections(c):
            wmap["project_in.weight"] = replicated(p + "project_in.weight", e, w)
            wmap["project_out.weight"] = replicated(p + "project_out.weight", w, e)
        if has_final_norm(c):
            wmap.update(norm_entries("final_norm", p + "final_layer_norm", e, bias=True))
        if not c.tie_word_embeddings:
            wmap.update(vocab_entries("lm_head", "lm_head", c.vocab_size, w))
        for i in range(c.num_hidden_layers):
            wmap.update(opt_layer_entries(c, f"layers.{i}.", f"{p}layers.{i}."))
        return wmap


def opt_layer_entries(c: OPTConfig, ours: str, hf: str) -> WeightMap:
    e, b = c.hidden_size, c.enable_bias
    attn = hf + "self_attn."
    return {
        **linear_entries(ours + "attn.qkv", [attn + "q_proj", attn + "k_proj", attn + "v_proj"], [e] * 3, e,
                         "column", b),
        **linear_entries(ours + "attn.out", [attn + "out_proj"], [e], e, "row", b),
        **linear_entries(ours + "mlp.up", [hf + "fc1"], [c.ffn_dim], e, "column", b),
        **linear_entries(ours + "mlp.down", [hf + "fc2"], [e], c.ffn_dim, "row", b),
        **norm_entries(ours + "attn_norm", hf + "self_attn_layer_norm", e, bias=True),
        **norm_entries(ours + "mlp_norm", hf + "final_layer_norm", e, bias=True),
    }
