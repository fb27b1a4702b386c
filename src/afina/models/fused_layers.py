"""RMSNorm and the SwiGLU feed-forward of Llama-family models as single autograd nodes.

transformers' RMSNorm upcasts its input to fp32 and runs six small ops, and autograd keeps the fp32
copy; its SwiGLU block keeps the gate, SiLU(gate), up and their product. On a CPU those copies
are most of a layer's activation memory and their ops a good share of its time. `RMSNormFunction`
keeps the input as it came and the inverse RMS; the fused feed-forward keeps the gate and up
projections only and recomputes SiLU and the product in backward, inside its down projection's
LoRA node (`afina.models.fused_lora`). Both compute the same values as transformers' modules.

`fuse_layers` swaps the forward of the norm and MLP modules of the architectures below (the same
formulas in each); other models keep their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from afina.models.fused_lora import FusedLoraLinear, fused_dtype

NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})


class RMSNormFunction(torch.autograd.Function):
    """weight * (x / rms(x) in fp32, cast back to x's dtype), as transformers' Llama RMSNorm; keeps x and 1/rms."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True).add_(eps))
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x.float() * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.float().mul_(rstd)
        grad_normed = (grad * weight).float()
        grad_x = (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True)).mul_(rstd).to(x.dtype)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None


def fused_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """down(SiLU(gate(x)) * up(x)); with a fused LoRA down projection the product is formed inside it."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if isinstance(down, FusedLoraLinear) and fused_dtype(down, up, (), {}) is not None:
        return down.forward_gated(gate, up)
    return down(F.silu(gate) * up)


def fuse_layers(model: nn.Module) -> int:
    """Give the RMSNorm and SiLU-gated MLP modules of known architectures the fused forward; returns
    how many modules changed. A subclass per class, so hooks, state dicts and isinstance still work."""
    swapped = 0
    for module in model.modules():
        name = type(module).__name__
        if name in NORMS:
            module.__class__ = _fused_class(type(module), fused_norm_forward)
        elif name in MLPS and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"):
            module.__class__ = _fused_class(type(module), fused_mlp_forward)
        else:
            continue
        swapped += 1
    return swapped


_FUSED_CLASSES: dict[type, type] = {}


def is_fused(module: nn.Module) -> bool:
    """Whether `fuse_layers` gave this module its fused forward."""
    return type(module) in _FUSED_CLASSES.values()


def _fused_class(cls: type, forward) -> type:
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": forward})
    return _FUSED_CLASSES[cls]
