"""A lean decode step for Llama-family models, over a KV cache that rows join and leave in place.

    decoder = LeanDecoder.for_model(model)         # None where the model needs transformers' own forward
    cache = SlotCache.like(decoder)
    order = cache.join(prefilled_layers, mask)     # rows prefilled by transformers join the running ones
    cache.open_column()                            # room for the token each row feeds next
    logits = decoder.step(next_ids, positions, cache, adapter_names)   # [rows, vocabulary]
    order = cache.keep(rows)                       # rows that finished leave; the new row order

One decode step feeds one token per row. transformers' forward pays, per step, for building a 4D
mask, its cache classes, a growing `torch.cat` of every layer's keys and values and an attention
kernel tuned for long queries; on a CPU those cost more than the model's matmuls at a few rows.
Here the step is the model's own modules (projections, norms, MLP, rotary tables) called in order,
with attention written out for one query per row: grouped queries against the cached keys (no
repeat of the key heads), padding masked by an additive bias.

The keys and values of a running batch live in buffers with spare rows and columns (`SlotCache`):
a decode step writes one column in place; a joining row is written into a free row, right-aligned
with the others (its left padding zeroed and masked); a finished row is replaced by the last row
(one row copied, not the whole cache); leading columns that no row uses any more are skipped by
moving `start`; when the last column is reached, the live columns move back to the first ones in
place. A buffer is reallocated only when the batch outgrows it, with ROW_ROOM rows and
COLUMN_ROOM columns to spare, in whole multiples of them: the cache's memory follows the batch's
size, and the few sizes it takes let the allocator reuse the blocks it freed instead of growing.

On a CPU every projection and the output head run as oneDNN matmuls on weights reordered once into
oneDNN's blocked layout (`torch.ops.mkldnn._linear_pointwise`, as PyTorch's compiler does for frozen
CPU models): the default matmul re-reads the weights in their plain layout at every call, and with a
few rows it is several times slower per weight byte. The reordered copies cost the weights' size in
memory once more (the model's own weights stay, for prefill and for anything else that reads them).

LoRA adapters (PEFT) keep working per row: each row adds its adapter's low-rank update, computed as
PEFT computes it, to the base projection; rows of the base model add nothing. Anything else (other
PEFT methods, forward hooks, sliding-window attention, rope scalings that depend on the length) is
left to transformers' forward: `for_model` returns None.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
FIXED_ROPE_TYPES = ("default", "linear", "llama3")  # cos/sin of a position do not depend on the length
ROW_ROOM, COLUMN_ROOM = 8, 64  # the spare rows and columns a buffer is allocated with
REORDER_ROWS = 8  # the batch size oneDNN's weight layout is chosen for (any number of rows works)


class LeanDecoder:
    """One decode step of a Llama-family model (with any LoRA adapters PEFT loaded on it)."""

    def __init__(self, model: nn.Module, inner: nn.Module):
        self.model, self.inner = model, inner
        config = inner.config
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim ** -0.5
        self.layers = list(inner.model.layers)
        parameter = next(inner.parameters())
        self.dtype, self.device = parameter.dtype, parameter.device
        self.cos = self.sin = None  # per position, [context, head_dim]; made at the first step
        self.reordered = reorder_weights(inner, self.device)  # id(nn.Linear) -> (oneDNN weight, bias)
        self.linears = [module for module in inner.modules() if id(module) in self.reordered]

    @classmethod
    def for_model(cls, model: nn.Module) -> LeanDecoder | None:
        """The decoder for `model`, or None where its forward does something this step does not."""
        inner = model
        try:
            from peft import PeftModel
            from peft.tuners.lora import Linear as LoraLinear
        except ImportError:  # pragma: no cover - peft is a dependency
            PeftModel, LoraLinear = (), ()
        if PeftModel and isinstance(model, PeftModel):
            for adapter in model.peft_config.values():
                if getattr(adapter, "peft_type", None) != "LORA" or getattr(adapter, "use_dora", False) or \
                        getattr(adapter, "is_prompt_learning", False):
                    return None
            inner = model.base_model.model
        if type(inner).__name__ not in ARCHITECTURES:
            return None
        config = inner.config
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type", "default")) not in FIXED_ROPE_TYPES:
            return None
        if any(kind != "full_attention" for kind in (getattr(config, "layer_types", None) or [])):
            return None
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and \
                window < int(getattr(config, "max_position_embeddings", 0) or 0):
            return None
        if any(module._forward_hooks or module._forward_pre_hooks for module in model.modules()):
            return None
        allowed = (nn.Linear, LoraLinear) if LoraLinear else (nn.Linear,)
        for layer in inner.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for module in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                           mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                if type(module) not in allowed or getattr(module, "lora_variant", None):
                    return None
            if any(type(m).__name__ not in ("ModuleList", "ModuleDict", "Identity", "Dropout", "Linear",
                                            "ParameterDict", "BufferDict")
                   for proj in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                                mlp.gate_proj, mlp.up_proj, mlp.down_proj) for m in proj.children()):
                return None
        if type(inner.lm_head) is not nn.Linear or type(inner.model.embed_tokens) is not nn.Embedding:
            return None
        return cls(model, inner)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at each row's position, [rows, 1, head_dim]: the model's own rotary module's
        values, computed once for every position up to the context length."""
        needed = int(positions.max()) + 1
        if self.cos is None or self.cos.shape[0] < needed:
            length = max(2 * needed, 1024)
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.inner.model.rotary_emb(probe, torch.arange(length, device=self.device)[None])
            self.cos, self.sin = cos[0], sin[0]
        return self.cos[positions][:, None], self.sin[positions][:, None]

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, cache: SlotCache,
             adapter_names: list[str] | None) -> torch.Tensor:
        """Logits of the next token after each row's `ids` (one per row, at `positions`), whose keys and
        values go to the column `cache.open_column()` opened. `adapter_names`: each row's PEFT adapter
        ("__base__" for none), None on a model without adapters."""
        rows = ids.shape[0]
        kwargs = self.adapter_rows(adapter_names)
        project = self.project
        cos, sin = self.rotary(positions)
        mask = cache.live_mask()
        bias = torch.zeros(mask.shape, dtype=self.dtype, device=self.device)
        bias.masked_fill_(mask == 0, torch.finfo(self.dtype).min)
        bias = bias[:, None, None, :]  # [rows, 1, 1, columns]
        groups = self.heads // self.kv_heads
        hidden = self.inner.model.embed_tokens(ids)  # [rows, hidden]
        for number, layer in enumerate(self.layers):
            attention, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(hidden)
            q = project(attention.q_proj, x, kwargs).view(rows, self.heads, self.head_dim)
            k = project(attention.k_proj, x, kwargs).view(rows, self.kv_heads, self.head_dim)
            v = project(attention.v_proj, x, kwargs).view(rows, self.kv_heads, self.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            keys, values = cache.write(number, k, v)  # [rows, kv_heads, columns, head_dim]
            q = q.view(rows, self.kv_heads, groups, self.head_dim)
            scores = torch.matmul(q, keys.transpose(-1, -2)) * self.scaling + bias
            out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(self.dtype), values)
            hidden = hidden + project(attention.o_proj, out.reshape(rows, self.heads * self.head_dim), kwargs)
            x = layer.post_attention_layernorm(hidden)
            gated = mlp.act_fn(project(mlp.gate_proj, x, kwargs)) * project(mlp.up_proj, x, kwargs)
            hidden = hidden + project(mlp.down_proj, gated, kwargs)
        return self.linear(self.inner.lm_head, self.inner.model.norm(hidden))

    @contextlib.contextmanager
    def reordered_linears(self) -> Iterator[None]:
        """While the block runs, the model's own forward (a prefill) uses the reordered weights too."""
        for module in self.linears:
            weight, bias = self.reordered[id(module)]
            module.forward = partial(torch.ops.mkldnn._linear_pointwise, W=weight, B=bias, attr="none", scalars=[],
                                     algorithm="")
        try:
            yield
        finally:
            for module in self.linears:
                del module.forward

    def adapter_rows(self, adapter_names: list[str] | None) -> dict[str, torch.Tensor] | None:
        """The rows of each adapter in use (None when every row uses the base model)."""
        if adapter_names is None:
            return None
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(adapter_names):
            if name != "__base__":
                rows.setdefault(name, []).append(row)
        return {name: torch.tensor(index, device=self.device) for name, index in rows.items()} or None

    def linear(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        reordered = self.reordered.get(id(module))
        if reordered is None:
            return module(x)
        return torch.ops.mkldnn._linear_pointwise(x, reordered[0], reordered[1], "none", [], "")

    def project(self, module: nn.Module, x: torch.Tensor, adapters: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """A projection for every row: its base layer, plus each row's LoRA update (PEFT's
        `_mixed_batch_forward`: lora_B(lora_A(dropout(x))) * scaling, on that adapter's rows)."""
        base = getattr(module, "base_layer", None)
        if base is None:
            return self.linear(module, x)
        result = self.linear(base, x)
        for name, index in (adapters or {}).items():
            if name not in module.lora_A:
                continue
            lora_A, lora_B = module.lora_A[name], module.lora_B[name]
            update = lora_B(lora_A(module.lora_dropout[name](x[index].to(lora_A.weight.dtype)))) * module.scaling[name]
            result[index] += update.to(result.dtype)
        return result


def reorder_weights(inner: nn.Module, device: torch.device) -> dict[int, tuple[torch.Tensor, torch.Tensor | None]]:
    """Every projection's and the output head's weight in oneDNN's layout, keyed by the module's id;
    empty off CPU or where this PyTorch has no oneDNN linear."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return {}
    linears = [inner.lm_head]
    for layer in inner.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for module in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                       mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linears.append(getattr(module, "base_layer", module))
    reordered = {}
    try:
        with torch.inference_mode():
            for module in linears:
                weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), REORDER_ROWS)
                reordered[id(module)] = (weight, None if module.bias is None else module.bias.detach())
            probe = torch.zeros((1, linears[0].in_features), dtype=linears[0].weight.dtype, device=device)
            torch.ops.mkldnn._linear_pointwise(probe, *reordered[id(linears[0])], "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):  # a build or dtype oneDNN does not serve
        return {}
    return reordered


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class CacheLayer:
    """One layer's live keys and values, [rows, kv_heads, columns, head_dim] (as a DynamicCache's
    layers expose them, for code that reads a cache of either kind)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values


class SlotCache:
    """The keys, values and padding mask of a running batch: rows [0, rows) and columns [start, end)
    of buffers with room to spare."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (layers, kv_heads, head_dim), dtype, device
        self.rows, self.start, self.end = 0, 0, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.reallocations = 0
        self.reserve(ROW_ROOM, 0, COLUMN_ROOM)

    @classmethod
    def like(cls, decoder: LeanDecoder) -> SlotCache:
        return cls(len(decoder.layers), decoder.kv_heads, decoder.head_dim, decoder.dtype, decoder.device)

    @property
    def layers(self) -> list[CacheLayer]:
        return [CacheLayer(k[:self.rows, :, self.start:self.end], v[:self.rows, :, self.start:self.end])
                for k, v in zip(self.keys, self.values)]

    def live_mask(self) -> torch.Tensor:
        """[rows, columns]: 1 where a row has a token cached, 0 on its left padding."""
        return self.mask[:self.rows, self.start:self.end]

    def reserve(self, rows: int, left: int, right: int) -> None:
        """Room for `rows` rows, `left` columns before `start` and `right` after `end`; a reallocation
        (the live part copied) only where there is not."""
        row_room, column_room = self.mask.shape
        if rows <= row_room and left <= self.start and self.end + right <= column_room:
            return
        live = self.end - self.start
        if rows <= row_room and left == 0 and live + right <= column_room and self.keys:
            # the columns before `start` are free: move the live ones there, in the same buffers
            for tensor in self.keys + self.values + [self.mask[:, None, :]]:
                tensor[:self.rows, :, :live] = tensor[:self.rows, :, self.start:self.end].clone()
            self.start, self.end = 0, live
            return
        new_rows = round_up(rows + ROW_ROOM, ROW_ROOM) if rows > row_room else row_room
        new_start = left
        new_columns = round_up(new_start + live + right + COLUMN_ROOM, COLUMN_ROOM)
        layers, heads, dim = self.shape
        keys = [torch.zeros((new_rows, heads, new_columns, dim), dtype=self.dtype, device=self.device)
                for _ in range(layers)]
        values = [torch.zeros_like(k) for k in keys]
        mask = torch.zeros((new_rows, new_columns), dtype=torch.long, device=self.device)
        if self.keys:
            for old, new in zip(self.keys + self.values, keys + values):
                new[:self.rows, :, new_start:new_start + live] = old[:self.rows, :, self.start:self.end]
            mask[:self.rows, new_start:new_start + live] = self.live_mask()
        self.keys, self.values, self.mask = keys, values, mask
        self.start, self.end = new_start, new_start + live
        self.reallocations += 1

    def join(self, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Add rows prefilled elsewhere (`layers`: per layer keys and values, [new rows, kv_heads,
        their columns, head_dim]; `mask` [new rows, their columns]), after the running rows,
        right-aligned with them."""
        joining, columns = mask.shape
        live = self.end - self.start
        if self.rows == 0:  # nothing running: start afresh at the joiners' width
            self.start = self.end = self.start + live
            live = 0
        extra = max(0, columns - live)
        self.reserve(self.rows + joining, extra, 1)
        if extra:  # the running rows get more left padding
            for tensor in self.keys + self.values:
                tensor[:self.rows, :, self.start - extra:self.start] = 0
            self.mask[:self.rows, self.start - extra:self.start] = 0
            self.start -= extra
        top, bottom, first = self.rows, self.rows + joining, self.end - columns
        for (k, v), keys, values in zip(layers, self.keys, self.values, strict=True):
            keys[top:bottom, :, self.start:first] = 0
            values[top:bottom, :, self.start:first] = 0
            keys[top:bottom, :, first:self.end] = k
            values[top:bottom, :, first:self.end] = v
        self.mask[top:bottom, self.start:first] = 0
        self.mask[top:bottom, first:self.end] = mask
        self.rows = bottom

    def open_column(self) -> None:
        """One more column, cached for every row (the token each feeds next)."""
        self.reserve(self.rows, 0, 1)
        self.mask[:self.rows, self.end] = 1
        self.end += 1

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's keys and values of the step ([rows, kv_heads, head_dim]) in the last column;
        the layer's live keys and values."""
        buffer_k, buffer_v = self.keys[layer], self.values[layer]
        buffer_k[:self.rows, :, self.end - 1] = keys
        buffer_v[:self.rows, :, self.end - 1] = values
        return buffer_k[:self.rows, :, self.start:self.end], buffer_v[:self.rows, :, self.start:self.end]

    def keep(self, kept: list[int]) -> list[int]:
        """Keep only the rows `kept` (ascending): each row that goes is replaced by the last kept row.
        Returns the new order: new row i was row order[i]."""
        order = list(range(self.rows))
        gone = [row for row in order if row not in set(kept)]
        last = self.rows - 1
        for hole in gone:
            while last > hole and last in gone:
                last -= 1
            if last <= hole:
                break
            for tensor in self.keys + self.values:
                tensor[hole, :, self.start:self.end] = tensor[last, :, self.start:self.end]
            self.mask[hole, self.start:self.end] = self.mask[last, self.start:self.end]
            order[hole] = last
            last -= 1
        self.rows = len(kept)
        order = order[:self.rows]
        used = self.live_mask().any(0).nonzero()
        if self.rows and len(used):
            self.start += int(used[0])
        return order
