"""LoRA layers computed as one autograd node: y = x W^T + b + s (drop(x) A^T) B^T.

PEFT's `lora.Linear` runs the update as separate modules: the input cast to the adapter's fp32
dtype, dropout, two linears, a multiply by the scale and an add. Each is a node of the autograd
graph with its own saved copy of the input, and under bf16 autocast the casts go there and back.
With a small model on a CPU those copies and nodes cost as much time as the adapter's arithmetic
and most of the activation memory. One node computes the same values keeping only the input
(which the base layer needs anyway), the rank-r projection and, with dropout, a bit mask.

afina swaps PEFT's layers for `FusedLoraLinear` (a subclass, so saving, merging and disabling
adapters work unchanged) for plain LoRA and rsLoRA on `nn.Linear` bases. A call the fused node does
not cover (adapters disabled or merged, several adapters, mixed dtypes outside autocast) goes
through PEFT's own forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

from afina.devices import compute_dtype


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA linear layer with its forward pass as one autograd node."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        dtype = fused_dtype(self, x, args, kwargs)
        if dtype is None:
            return super().forward(x, *args, **kwargs)
        return self._fused(x, None, dtype)

    def forward_gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """This layer applied to SiLU(gate) * up (a SwiGLU block's down projection) without keeping
        the product: the node keeps gate and up and forms it again in backward."""
        return self._fused(up, gate, fused_dtype(self, up, (), {}))

    def _fused(self, x: torch.Tensor, gate: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        name = self.active_adapters[0]
        dropout = self.lora_dropout[name]
        p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
        keep = None
        if p > 0:
            keep, p = keep_mask(x.shape, p, x.device)
        base = self.base_layer
        return LoraLinearFunction.apply(x, base.weight, base.bias, self.lora_A[name].weight,
                                        self.lora_B[name].weight, self.scaling[name], keep, p, dtype, gate)


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Dropout's keep mask (True with probability 1 - p) and the rate it was drawn with.

    On a CPU, `bernoulli_` draws one Mersenne Twister number per element: about 2 ms for one layer's
    input at 458 tokens, as long as the layer's own matmuls, and a LoRA layer with dropout needs a
    mask per call. Here each 64-bit draw of torch's generator gives four 16-bit uniforms, a quarter
    of the draws; the rate is rounded to a multiple of 1/65536 (0.05 becomes 0.050003) and returned,
    so the update is scaled by exactly 1 / (1 - rate). Other devices draw with `bernoulli_`.
    """
    if device.type != "cpu":
        return bernoulli_mask(shape, p, device)
    count = math.prod(shape)
    bits = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), None)  # the full 64-bit range
    threshold = min(round(p * 65536), 65535)  # a rate that rounds to 1 would keep nothing
    keep = bits.view(torch.int16)[:count].view(shape) >= threshold - 32768
    return keep, threshold / 65536


def bernoulli_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """`keep_mask` drawn by `bernoulli_`, one draw per element (what `nn.Dropout` does), rate exactly p."""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1 - p), p


def fused_dtype(layer: FusedLoraLinear, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.dtype | None:
    """The dtype the fused node computes in, or None where PEFT's forward must run."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant or layer.base_layer.weight.requires_grad:
        return None
    if torch.is_autocast_enabled(x.device.type):
        return compute_dtype(x)
    same = {x.dtype, layer.base_layer.weight.dtype, layer.lora_A[name].weight.dtype}
    return x.dtype if len(same) == 1 else None  # PEFT mixes dtypes its own way; leave that to it


class LoraLinearFunction(torch.autograd.Function):
    """y = x W^T + b + s (drop(x) A^T) B^T with W (and b) frozen; gradients for x, A and B.

    Dropout keeps the inputs where `keep` (shaped like x) is True, scaled by 1 / (1 - p); None: no dropout.
    With `gate`, the layer's input is SiLU(gate) * x, formed here and again in backward rather than
    kept; gate then gets a gradient too.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, keep, p: float, dtype: torch.dtype,
                gate=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dtype)
        if gate is not None:
            gate = gate.reshape(x2.shape).to(dtype)
            x2, up = F.silu(gate) * x2, x2
        w, a, b = weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
        dropped = x2
        if keep is not None:  # 1 / (1 - p) goes into the scale: the kept inputs are used as they are
            keep = keep.reshape(x2.shape)
            dropped = x2 * keep
            scale = scale / (1 - p)
        xa = dropped @ a.t()
        y = x2 @ w.t() if bias is None else torch.addmm(bias.to(dtype), x2, w.t())
        y.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2 if gate is None else up, w, a, b, xa, keep, gate)
        ctx.scale, ctx.shape = scale, shape
        ctx.dtypes = x.dtype, lora_a.dtype, lora_b.dtype
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x2, w, a, b, xa, keep, gate = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        up = x2
        if gate is not None:
            silu = F.silu(gate)
            x2 = silu * up
        dy = grad.reshape(-1, grad.shape[-1]).to(w.dtype)
        dxa = (dy @ b).mul_(ctx.scale)  # gradient at drop(x) A^T (1 / (1 - p) is in the scale)
        grad_b = (dy.t() @ xa).mul_(ctx.scale)
        dropped = x2 if keep is None else x2 * keep
        grad_a = dxa.t() @ dropped
        grad_x = grad_gate = None
        if ctx.needs_input_grad[0] or gate is not None:
            if keep is None:
                grad_x = (dy @ w).addmm_(dxa, a)
            else:
                grad_x = (dy @ w).add_((dxa @ a).mul_(keep))
            if gate is not None:  # through the product SiLU(gate) * up
                grad_gate = torch.ops.aten.silu_backward(grad_x * up, gate).to(x_dtype).view(ctx.shape)
                grad_x = grad_x.mul_(silu)
            grad_x = grad_x.to(x_dtype).view(ctx.shape)
        return grad_x, None, None, grad_a.to(a_dtype), grad_b.to(b_dtype), None, None, None, None, grad_gate


def fuse_lora_layers(model: nn.Module) -> int:
    """Swap every plain PEFT LoRA linear layer on an nn.Linear base for the fused one; returns how many."""
    swapped = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear and type(module.base_layer) is nn.Linear:
            module.__class__ = FusedLoraLinear
            swapped += 1
    return swapped
