"""LoReFT: low-rank linear subspace representation fine-tuning (Wu et al. 2024, "ReFT").

Each chosen decoder layer's output h is edited inside an r-dimensional subspace:

    h + R^T (W h + b - R h)        R: r x d with orthonormal rows; W, b: a linear map d -> r

The base weights stay frozen; only R, W and b are trained. The edit is applied by forward hooks on
the decoder layers, so the model stays a plain transformers model (generation, devices, dtypes
work as before). No maintained library supports current transformers, hence this small module.

Positions. With `all`, every position is edited. With `prompt_ends` (the paper's setting) only the
first `first` and last `last` prompt tokens of each example are edited: in training the loss says
which tokens are prompt (`prompt_mask`, see `prompt_mask_from_targets`); in generation the prompt
is the whole input of the first forward pass, and generated tokens are left alone.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from afina.errors import AfinaError

IGNORE = -100  # the loss's "not trained" target (afina.data.packing.IGNORE; models do not import data)


class LoreftIntervention(nn.Module):
    """h -> h + R^T(W h + b - R h) for one layer; computed in the module's dtype (fp32)."""

    def __init__(self, hidden_size: int, rank: int, dropout: float):
        super().__init__()
        # Householder without trivialization keeps R fully described by its parameter (no hidden
        # buffer), so a checkpoint or a saved artifact restores R exactly; for an r x d matrix it
        # also avoids the d x d matrix exponential of the default map.
        self.rotate = orthogonal(nn.Linear(hidden_size, rank, bias=False), orthogonal_map="householder",
                                 use_trivialization=False)
        self.learned = nn.Linear(hidden_size, rank)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.learned.weight.dtype)
        rotate = self.rotate.weight
        edit = (self.learned(x) - x @ rotate.T) @ rotate
        return hidden + self.dropout(edit).to(hidden.dtype)


class LoreftInterventions(nn.Module):
    """All interventions of a model, the hooks that apply them, and the switch that turns them off.

    Registered on the model as a submodule, so its parameters move, train and save with it.
    """

    def __init__(self, hidden_size: int, layer_indices: list[int], rank: int, dropout: float, positions: str,
                 first: int, last: int):
        super().__init__()
        self.layers = nn.ModuleDict({str(i): LoreftIntervention(hidden_size, rank, dropout) for i in layer_indices})
        self.positions, self.first, self.last = positions, first, last
        self.enabled = True
        self._prompt_mask: torch.Tensor | None = None  # handed over by the body for the next forward pass
        self._where: torch.Tensor | None = None  # (rows, length) positions edited in the current pass
        self._skip = False  # the current pass edits nothing (a generation step after the prompt)
        self._handles: list = []

    def attach(self, body: nn.Module, decoder_layers: nn.ModuleList) -> None:
        """Hook the body (to choose positions once per pass) and each intervened layer."""
        self._handles.append(body.register_forward_pre_hook(self._choose_positions, with_kwargs=True))
        for index in self.layers:
            layer = decoder_layers[int(index)]
            self._handles.append(layer.register_forward_hook(self._edit_hook(index)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set_prompt_mask(self, prompt_mask: torch.Tensor | None) -> None:
        """Called by the training body before each forward pass; `prompt_ends` cannot train without it."""
        if self.positions == "prompt_ends" and prompt_mask is None:
            raise AfinaError("loreft_prompt_mask_missing", "loreft with positions: prompt_ends needs the prompt "
                             "tokens of each example, and the loss did not pass prompt_mask to the model body",
                             location="method.positions",
                             hint="use positions: all, or call body(..., prompt_mask=prompt_mask_from_targets(...))")
        self._prompt_mask = prompt_mask

    def _choose_positions(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        prompt, self._prompt_mask = self._prompt_mask, None
        self._skip, self._where = False, None
        if self.positions == "all":
            return
        inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if inputs is None and args:
            inputs = args[0]
        rows, length = inputs.shape[0], inputs.shape[1]
        position_ids = kwargs.get("position_ids")
        if prompt is None:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            if cache is not None and cache.get_seq_length() > 0:  # generating past the prompt
                self._skip = True
                return
            mask = kwargs.get("attention_mask")
            prompt = (mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2
                      else torch.ones(rows, length, dtype=torch.bool, device=inputs.device))
            if mask is not None:  # left-padded generation: one sequence per row, padding excluded
                position_ids = None
        segments = segment_ids(position_ids, rows, length, inputs.device)
        self._where = prompt_end_positions(prompt, segments, self.first, self.last)

    def _edit_hook(self, index: str):
        def hook(module: nn.Module, args: tuple, output):
            if not self.enabled or self._skip:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            edited = self.layers[index](hidden)
            if self._where is not None:
                edited = torch.where(self._where.unsqueeze(-1), edited, hidden)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook


def segment_ids(position_ids: torch.Tensor | None, rows: int, length: int, device) -> torch.Tensor:
    """Which packed example each token belongs to, by the rule transformers uses: a new example starts
    wherever the position id does not continue the previous one by 1. No position ids: one per row."""
    if position_ids is None:
        return torch.zeros(rows, length, dtype=torch.long, device=device)
    position_ids = position_ids.expand(rows, -1)
    step = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=1)
    return (step != 1).long().cumsum(1)


def example_slots(position_ids: torch.Tensor | None, rows: int, length: int,
                  device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Packed examples laid out one per row: for each token its example (counted over all rows) and its
    offset inside it, then how many examples there are and the longest one's length."""
    segments = segment_ids(position_ids, rows, length, device)
    per_row = segments[:, -1] + 1
    example = segments + (torch.cumsum(per_row, 0) - per_row)[:, None]
    offset = count_in_segments(torch.ones(rows, length, dtype=torch.bool, device=device), segments)[0] - 1
    return example, offset, int(per_row.sum()), int(offset.max()) + 1


def count_in_segments(flags: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token: how many flagged tokens of its segment come up to and including it, and how
    many its segment has in all."""
    rows, length = flags.shape
    group = (segments + torch.arange(rows, device=flags.device)[:, None] * length).flatten()
    ones = flags.long().flatten()
    running = flags.long().cumsum(1).flatten()
    start = torch.zeros(rows * length, dtype=torch.long, device=flags.device).scatter_reduce(
        0, group, running - ones, "amin", include_self=False)
    total = torch.zeros(rows * length, dtype=torch.long, device=flags.device).scatter_add(0, group, ones)
    return (running - start[group]).view(rows, length), total[group].view(rows, length)


def prompt_end_positions(prompt: torch.Tensor, segments: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """The first `first` and last `last` prompt tokens of every segment."""
    rank, total = count_in_segments(prompt, segments)
    return prompt & ((rank <= first) | (rank > total - last))


def prompt_mask_from_targets(targets: torch.Tensor, position_ids: torch.Tensor, ignore: int = IGNORE) -> torch.Tensor:
    """The prompt tokens of each packed example: those up to the one that predicts the first trained
    token (targets are aligned with inputs: position t holds the token t+1 it predicts)."""
    trained = targets != ignore
    rank, _ = count_in_segments(trained, segment_ids(position_ids, *targets.shape, targets.device))
    return (rank - trained.long()) == 0

