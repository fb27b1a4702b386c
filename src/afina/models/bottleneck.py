"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

A small residual MLP is placed on the output of the attention block and of the MLP block of each
chosen decoder layer, before that output joins the residual stream:

    z -> z + up(act(down(z)))         down: d -> b, up: b -> d, b much smaller than d

`up` starts at zero, so the adapted model computes exactly what the base computes until training
moves it. Applied by forward hooks, so the model stays a plain transformers model.
"""

from __future__ import annotations

import torch
from torch import nn

from afina.errors import AfinaError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")  # what architectures call the block
MLP_NAMES = ("mlp", "feed_forward", "ffn")


class BottleneckAdapter(nn.Module):
    """z -> z + up(act(down(z))), computed in the module's dtype (fp32)."""

    def __init__(self, hidden_size: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)  # identity at the start: training begins from the base model
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.down.weight.dtype)
        return hidden + self.up(self.act(self.down(x))).to(hidden.dtype)


class LayerAdapters(nn.Module):
    """The two adapters of one decoder layer."""

    def __init__(self, hidden_size: int, bottleneck: int, activation: str):
        super().__init__()
        self.attention = BottleneckAdapter(hidden_size, bottleneck, activation)
        self.mlp = BottleneckAdapter(hidden_size, bottleneck, activation)


class BottleneckAdapters(nn.Module):
    """All adapters of a model, their hooks, and the switch that turns them off.

    Registered on the model as a submodule, so its parameters move, train and save with it.
    """

    def __init__(self, hidden_size: int, layer_indices: list[int], bottleneck: int, activation: str):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): LayerAdapters(hidden_size, bottleneck, activation)
                                     for i in layer_indices})
        self.enabled = True
        self._handles: list = []

    def attach(self, decoder_layers: nn.ModuleList) -> None:
        """Hook the attention and MLP blocks of each adapted layer."""
        for index, adapters in self.layers.items():
            layer = decoder_layers[int(index)]
            attention, mlp = find_block(layer, ATTENTION_NAMES, index), find_block(layer, MLP_NAMES, index)
            self._handles.append(attention.register_forward_hook(self._adapt_hook(adapters.attention)))
            self._handles.append(mlp.register_forward_hook(self._adapt_hook(adapters.mlp)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _adapt_hook(self, adapter: BottleneckAdapter):
        def hook(module: nn.Module, args: tuple, output):
            if not self.enabled:
                return output
            # attention blocks return (output, attention weights); MLP blocks a tensor
            if isinstance(output, tuple):
                return (adapter(output[0]), *output[1:])
            return adapter(output)

        return hook


def find_block(layer: nn.Module, names: tuple[str, ...], index: str) -> nn.Module:
    for name in names:
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    raise AfinaError("unsupported_architecture", f"decoder layer {index} has none of the blocks {', '.join(names)}",
                     location="method", hint="use lora, which adapts any architecture with linear layers")
