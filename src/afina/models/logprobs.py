"""Log-probabilities and reward scores of whole answers, read off a prepared model.

What the preference objectives' losses and their evaluation both need: per-sequence sums of the
answer tokens' log-probabilities (`sequence_logps`), and a reward model's score of each sequence
(`reward_scores`), from one forward pass over a packed batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from afina.data.packing import IGNORE
from afina.data.preference import SequenceBatch, collate_sequences
from afina.models.methods import body_and_head, unwrap

CHUNK_TOKENS = 1024  # completion positions projected to the vocabulary at once (1024 x 49k fp32 = 200 MB)
REWARD_HEAD = "reward_head"  # attribute of the unwrapped transformers model holding a reward model's head


def sequence_logps(model, batch: SequenceBatch, chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sums of the log-probabilities of the trained (answer) tokens, and their counts.

    One forward pass over the packed batch; the vocabulary projection runs only at trained
    positions (as `sft_loss_sum` does), and the token log-probs are added up per sequence through
    `batch.sequence_ids`, so several sequences packed in one row stay apart. For the reference
    model of a LoRA run, call it under `torch.no_grad()` and `model.disable_adapter()`.

    Returns float32 tensors of shape (batch.num_sequences,): summed log-probs and token counts
    (divide one by the other for ORPO's mean log-probs).
    """
    body, head = body_and_head(model)
    hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    mask = batch.targets != IGNORE
    return gather_sequence_logps(hidden[mask], batch.targets[mask], batch.sequence_ids[mask], head,
                                 batch.num_sequences, chunk)


def gather_sequence_logps(hidden: torch.Tensor, targets: torch.Tensor, sequence_ids: torch.Tensor,
                          head: torch.nn.Module, num_sequences: int,
                          chunk: int = CHUNK_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum log softmax(head(hidden))[target] per sequence id; hidden is (positions, hidden_size).

    With gradients on and more positions than `chunk`, each chunk's logits are recomputed in the
    backward pass instead of kept, so no more than one chunk of logits is ever held.
    """
    token_logps = []
    for start in range(0, hidden.shape[0], chunk):
        piece = (hidden[start : start + chunk], targets[start : start + chunk], head)
        if torch.is_grad_enabled() and hidden.shape[0] > chunk:
            token_logps.append(checkpoint(_token_logps, *piece, use_reentrant=False))
        else:
            token_logps.append(_token_logps(*piece))
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=hidden.device)
    if token_logps:
        sums = sums.index_add(0, sequence_ids, torch.cat(token_logps))
    counts = torch.bincount(sequence_ids, minlength=num_sequences).to(torch.float32)
    return sums, counts


def _token_logps(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def last_token_hidden(hidden: torch.Tensor, batch: SequenceBatch) -> torch.Tensor:
    """The hidden state at each sequence's last token, (num_sequences, hidden_size): what a reward head scores.

    TRL's reward models read the score at the last non-padding token; in a packed row that is the
    last position carrying the sequence's id.
    """
    rows, columns = batch.last_positions()
    return hidden[rows, columns]


def reward_scores(model, batch: SequenceBatch) -> torch.Tensor:
    """One score per sequence of `batch`: the reward head on the hidden state of its last token."""
    body, _ = body_and_head(model)
    hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).last_hidden_state
    head = getattr(unwrap(model), REWARD_HEAD)
    last = last_token_hidden(hidden, batch)
    return head(last.to(head.weight.dtype)).squeeze(-1).float()


def score_sequences(model, examples: list, row_length: int, pad_id: int) -> torch.Tensor:
    """Reward scores of tokenized prompt+answer `Example`s, in order."""
    device = next(model.parameters()).device
    return reward_scores(model, collate_sequences(examples, row_length, pad_id).to(device))
