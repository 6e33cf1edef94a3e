"""CausalLM: what every inference model shares (construction, forward over the paged cache, LM
head on selected positions, loading through the weight map)."""
from collections.abc import Mapping

import torch
from torch import nn

from hybrid_engine.kernels.validate import CPU_DTYPES, GPU_DTYPES
from hybrid_engine.models import prepack
from hybrid_engine.models.layers import AttentionBatch, DecoderLayer, Linear, TensorParallel, VocabParallelEmbedding
from hybrid_engine.models.weights import WeightMap, load_weights


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    if device.type == "cpu" and dtype not in CPU_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported on the CPU (float16 matrix products run at a few "
                         f"hundred MFLOP/s there); use torch.float32 or torch.bfloat16")
    if dtype not in GPU_DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")


class CausalLM(nn.Module):
    """A decoder-only LM over a paged KV cache. Subclasses build embeddings, layers and head from a
    `transformers` config and describe their weights with `weight_map`.

    Constructing one allocates empty weights for (config, tp_rank, tp_size, dtype): the resharder
    fills `model.state_dict()` tensors in place; `from_hf` fills them from a full state dict.
    """
    config_class: type = None

    def __init__(self, config, tp_rank: int = 0, tp_size: int = 1, tp_group=None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        device = torch.device(device)
        check_dtype(dtype, device)
        self.config, self.dtype, self.device = config, dtype, device
        self.tp = TensorParallel(tp_rank, tp_size, tp_group)
        self.factory = {"dtype": dtype, "device": device}
        self.layers = nn.ModuleList(self.build_layer(i) for i in range(config.num_hidden_layers))
        attention = self.layers[0].attn
        self.num_kv_heads, self.head_dim = attention.num_kv_heads, attention.head_dim
        self.packed_lm_head = None

    # --- what a model family defines -------------------------------------------------------
    @classmethod
    def weight_map(cls, config) -> WeightMap:
        """Inference tensor name (a key of `model.state_dict()`) -> its Hugging Face sources, in
        packing order, each with its full shape and TP split. The map does not depend on the TP
        degree: rank r of t holds `WeightSource.shard_range(r, t)` of every source."""
        raise NotImplementedError

    def build_layer(self, index: int) -> DecoderLayer:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def final(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """Hidden states of the last layer -> input of the LM head."""
        raise NotImplementedError

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    # --- shared ---------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def output_embedding(self) -> VocabParallelEmbedding:
        """The LM head's table: the token embedding's when tied."""
        return self.embed_tokens if self.config.tie_word_embeddings else self.lm_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionBatch,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None, select: torch.Tensor | None = None
                ) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, head input dim] (only rows `select` if given,
        e.g. each prompt's last token); writes K/V of all T tokens, or none without kv_caches (a
        prefill only: decoding reads the cache)."""
        if kv_caches is None:
            if not batch.is_prefill:
                raise ValueError("a forward without a KV cache must be a prefill (cu_seqlens given)")
            kv_caches = [(None, None)] * self.num_layers
        else:
            batch.check_indices(kv_caches[0][0])
        h, residual = self.embed(input_ids, positions), None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            h, residual = layer(h, residual, positions, batch, k_cache, v_cache)
        if select is not None:
            h, residual = h[select], None if residual is None else residual[select]
        return self.final(h, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Only the rows that get sampled go through the LM head; every TP rank gets the logits of
        the whole vocabulary."""
        return self.output_embedding.logits(hidden, self.packed_lm_head)

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets [T]) under the logits of hidden [T, head input dim], float32; under tensor
        parallelism no rank gathers the whole vocabulary's logits."""
        return self.output_embedding.logprobs(hidden, targets, self.packed_lm_head)

    def prepack_weights(self, enabled: bool = True) -> None:
        """Keep oneDNN-blocked copies of the linear weights (CPU, where oneDNN can pack this dtype; see
        models.prepack), or drop them."""
        # Inference tensors (made under torch.inference_mode) have no version counter to watch.
        head = self.output_embedding.weight
        enabled = enabled and prepack.available(self.device, self.dtype) and not head.is_inference()
        for module in self.modules():
            if isinstance(module, Linear):
                module.packed = prepack.PackedWeight() if enabled else None
        self.packed_lm_head = prepack.PackedWeight() if enabled else None

    def freeze_packed_weights(self) -> None:
        """For weights that never change again (a frozen scorer): pack every linear now and free its
        plain weight, so the linears are held once. Only where every product goes through the packed
        weights (bf16 on a CPU that packs it); the linears cannot be loaded or resharded afterwards."""
        if not prepack.always_used(self.device, self.dtype):
            raise ValueError(f"freeze_packed_weights: {self.dtype} products on {self.device} do not all go through "
                             f"oneDNN's packed weights here, the plain weights are still needed")
        self.prepack_weights(True)
        for module in self.modules():
            if isinstance(module, Linear):
                module.packed.freeze(module.weight)
                module.weight = module.weight.new_empty(0)

    @classmethod
    def from_hf(cls, model_or_state_dict, config=None, *, dtype: torch.dtype | None = None,
                tp_rank: int = 0, tp_size: int = 1, tp_group=None, device: torch.device | str | None = None):
        """Convert a `transformers` causal LM (or its state dict plus config) once into the inference
        layout and dtype; with tp_size > 1, keep only rank tp_rank's slices."""
        state_dict = as_state_dict(model_or_state_dict)
        config = config if config is not None else model_or_state_dict.config
        first = next(iter(state_dict.values()))
        model = cls(config, tp_rank, tp_size, tp_group, dtype or first.dtype, device or first.device)
        with torch.no_grad():
            load_weights(dict(model.named_buffers()), cls.weight_map(config), state_dict, tp_rank, tp_size)
        return model


def as_state_dict(model_or_state_dict) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    raise TypeError(f"expected a transformers model or a state dict, got {type(model_or_state_dict).__name__}")
