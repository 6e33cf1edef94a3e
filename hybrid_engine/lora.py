"""PEFT LoRA adapters merged into the inference weights, W + scale * B @ A, each TP rank computing
only its slice (B's rows for column-parallel weights, A's columns for row-parallel ones). The
training weights and adapters are never written."""
from dataclasses import dataclass

import torch
from torch import nn

from hybrid_engine.models.weights import WeightMap, WeightSource

PEFT_PREFIX = "base_model.model."


def base_name(name: str) -> str:
    """The transformers name of a parameter inside a PEFT model:
    base_model.model.x.q_proj.base_layer.weight -> x.q_proj.weight."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


@dataclass
class Adapter:
    weight: str          # transformers name of the adapted weight
    a: nn.Parameter      # [r, in]
    b: nn.Parameter      # [out, r]
    scale: float

    def delta(self) -> torch.Tensor:
        """scale * B @ A, in float32 (the whole weight's; delta_slice gives a TP rank's)."""
        return lora_delta(self.b, self.a, self.scale)


def lora_delta(b: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    return (b.float() @ a.float()) * scale


def merged(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + delta, added in float32 and rounded once to W's dtype."""
    return (weight.float() + delta).to(weight.dtype)


def find_adapters(module: nn.Module) -> list[Adapter]:
    adapters = []
    for name, layer in module.named_modules():
        if not hasattr(layer, "lora_A") or not hasattr(layer, "scaling"):
            continue
        for adapter in layer.active_adapters:
            check_supported(name, layer, adapter)
            if adapter in layer.lora_A:
                adapters.append(Adapter(base_name(name) + ".weight", layer.lora_A[adapter].weight,
                                        layer.lora_B[adapter].weight, float(layer.scaling[adapter])))
    return adapters


def check_supported(name: str, layer: nn.Module, adapter: str) -> None:
    if getattr(layer, "use_dora", {}).get(adapter, False):
        raise ValueError(f"{name}: DoRA adapters are not supported (plain LoRA only)")
    if adapter in getattr(layer, "lora_embedding_A", {}):
        raise ValueError(f"{name}: LoRA on embeddings is not supported (linear layers only)")
    if getattr(layer, "fan_in_fan_out", False):
        raise ValueError(f"{name}: fan_in_fan_out LoRA layers (GPT-2 Conv1D) are not supported")


def delta_slice(adapter: Adapter, source: WeightSource, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of scale * B @ A, in float32."""
    b = source.shard(adapter.b, tp_rank, tp_size) if source.split == "column" else adapter.b
    a = source.shard(adapter.a, tp_rank, tp_size) if source.split == "row" else adapter.a
    return lora_delta(b, a, adapter.scale)


@torch.no_grad()
def merge_adapters(adapters: list[Adapter], weight_map: WeightMap, targets: dict[str, torch.Tensor],
                   tp_rank: int, tp_size: int) -> None:
    by_weight: dict[str, list[Adapter]] = {}
    for adapter in adapters:
        by_weight.setdefault(adapter.weight, []).append(adapter)
    used = set()
    for name, sources in weight_map.items():
        row = 0
        for source in sources:
            for adapter in by_weight.get(source.name, []):
                delta = delta_slice(adapter, source, tp_rank, tp_size)
                region = targets[name].narrow(0, row, delta.shape[0])  # a padded slice's rows, less its padding
                region.copy_(merged(region, delta))
                used.add(source.name)
            row += source.shard_shape(tp_size)[0]
    unused = set(by_weight) - used
    if unused:
        raise ValueError(f"LoRA adapters on weights the inference model does not use: {sorted(unused)}")
