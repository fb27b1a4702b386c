"""What the one training loop iterates over and minimizes, for each objective.

    objective = objective_for(config)                  # OBJECTIVES[config.objective.name](...)
    for items in objective.epoch_steps(units, training, epoch):        # one optimizer step each
        for batch in micro-batches of items:                             # cut by the loop
            loss = objective.loss_sum(model, batch) / (sum of objective.count over the step's batches)

| objective | a unit (tokenized row) | an item (what micro-batches are cut from) | count (denominator) |
| --- | --- | --- | --- |
| sft, cpt | `Example` | a packed row of examples | trained tokens |
| dpo, orpo, reward | `PreferencePair` | a pair | pairs |
| kto | `KtoExample` | an example and its mismatched completion (for the KL estimate) | completions |

`training.rows_per_batch` is the items of one micro-batch (packed rows, pairs or completions),
halved on out of memory; an optimizer step always holds `rows_per_batch x gradient_accumulation`
items, so a step's units never change. Each epoch's steps are a pure function of (units, seed,
epoch), which is what makes resuming exact.

dpo and kto need the reference model: the frozen base of an adapter run, computed by the same
model inside `base_model(model)` (no second copy). Full and freeze runs change the base weights,
so they are refused for dpo and kto (`check_objective_supported`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from afina.config.schema import ObjectiveConfig, RunConfig, TrainingConfig
from afina.data.packing import Batch, collate_rows, epoch_steps, pack_examples, row_sizes
from afina.data.preference import (KtoBatch, SequenceBatch, collate_kto, collate_pairs, collate_sequences,
                                   mismatched_completions)
from afina.errors import AfinaError
from afina.models.adapters import base_model, body_and_head, freezes_base, shares_prefixes, unwrap
from afina.training.objectives import (dpo_loss, kto_kl_estimate, kto_loss, last_token_hidden, orpo_loss,
                                       reward_loss, sequence_logps)

REWARD_HEAD = "reward_head"  # attribute of the unwrapped transformers model holding a reward model's head


def rows_per_step(config: TrainingConfig) -> int:
    """Items (packed rows, pairs or completions) in one optimizer step."""
    return config.rows_per_batch * config.gradient_accumulation


def shuffled_steps(items: Sequence, per_step: int, seed: int, epoch: int) -> list[list]:
    """`items` shuffled by (seed, epoch) as `epoch_steps` shuffles examples, `per_step` at a time."""
    order = list(items)
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i : i + per_step] for i in range(0, len(order), per_step)]


@dataclass(frozen=True)
class TokenObjective:
    """sft and cpt: summed cross-entropy of the trained tokens of packed rows, per trained token.
    With `share_prefixes` (every method but those acting at each example's own positions), examples
    read the prefix they share with their row's first example instead of holding it
    (`afina.data.packing`): a row holds more examples for the same positions computed."""

    config: ObjectiveConfig
    row_length: int
    max_length: int
    share_prefixes: bool = True

    def items(self, units: list) -> list:
        return pack_examples(units, self.row_length, self.share_prefixes)

    def epoch_steps(self, units: list, training: TrainingConfig, epoch: int) -> list[list]:
        return epoch_steps(units, self.row_length, rows_per_step(training), training.seed, epoch, self.share_prefixes)

    def collate(self, items: list, pad_id: int) -> Batch:
        return collate_rows(items, pad_id, share_prefixes=self.share_prefixes)

    def row_tokens(self, row: list) -> int:
        """Positions a packed row computes."""
        return sum(row_sizes(row, self.share_prefixes))

    def count(self, batch: Batch) -> int:
        return batch.trained_tokens

    def loss_sum(self, model, batch: Batch) -> torch.Tensor:
        from afina.training import loop  # looked up at call time: tests replace loop.sft_loss_sum

        return loop.sft_loss_sum(model, batch)


@dataclass(frozen=True)
class PairObjective:
    """Shared by the objectives that read preference pairs; one pair is one item and one count."""

    config: ObjectiveConfig
    row_length: int
    max_length: int

    def items(self, units: list) -> list:
        return list(units)

    def epoch_steps(self, units: list, training: TrainingConfig, epoch: int) -> list[list]:
        return shuffled_steps(units, rows_per_step(training), training.seed, epoch)

    def collate(self, items: list, pad_id: int) -> SequenceBatch:
        return collate_pairs(items, self.row_length, pad_id)

    def count(self, batch: SequenceBatch) -> int:
        return batch.num_sequences // 2


class DpoObjective(PairObjective):
    """DPO against the frozen base (`dpo_loss`), per pair."""

    def loss_sum(self, model, batch: SequenceBatch) -> torch.Tensor:
        with torch.no_grad(), base_model(model):
            ref_chosen, ref_rejected = sequence_logps(model, batch)[0].chunk(2)
        chosen, rejected = sequence_logps(model, batch)[0].chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.config.beta, self.config.label_smoothing)[0]


class OrpoObjective(PairObjective):
    """ORPO (`orpo_loss`): NLL of the chosen answer plus the odds-ratio term, per pair; no reference."""

    def loss_sum(self, model, batch: SequenceBatch) -> torch.Tensor:
        sums, counts = sequence_logps(model, batch)
        return orpo_loss(*(sums / counts.clamp(min=1)).chunk(2), beta=self.config.beta)[0]


class RewardObjective(PairObjective):
    """A reward model: the scalar head on each answer's last token, pairwise loss (`reward_loss`), per pair."""

    def loss_sum(self, model, batch: SequenceBatch) -> torch.Tensor:
        chosen, rejected = reward_scores(model, batch).chunk(2)
        margin = torch.full_like(chosen, self.config.margin) if self.config.margin else None
        return reward_loss(chosen, rejected, margin, self.config.center_coefficient)


@dataclass(frozen=True)
class KtoItem:
    """A KTO example and its mismatched completion (its prompt with another example's answer)."""

    example: object  # KtoExample
    mismatched: object  # Completion


@dataclass(frozen=True)
class KtoObjective:
    """KTO against the frozen base (`kto_loss`), per completion.

    The KL reference point z0 is estimated per micro-batch, as TRL does, from mismatched completions
    paired within the optimizer step (prompt i with answer i-1), so a micro-batch of one, after an
    out-of-memory halving, still pairs its prompt with another answer.
    """

    config: ObjectiveConfig
    row_length: int
    max_length: int

    def items(self, units: list) -> list[KtoItem]:
        mismatched = mismatched_completions([u.completion for u in units], self.max_length)
        return [KtoItem(unit, other) for unit, other in zip(units, mismatched)]

    def epoch_steps(self, units: list, training: TrainingConfig, epoch: int) -> list[list]:
        return [self.items(step) for step in shuffled_steps(units, rows_per_step(training), training.seed, epoch)]

    def collate(self, items: list[KtoItem], pad_id: int) -> KtoBatch:
        return collate_kto([i.example for i in items], self.row_length, pad_id, self.max_length,
                           [i.mismatched for i in items])

    def count(self, batch: KtoBatch) -> int:
        return int(batch.desirable.numel())

    def loss_sum(self, model, batch: KtoBatch) -> torch.Tensor:
        with torch.no_grad():
            with base_model(model):
                ref = sequence_logps(model, batch.completions)[0]
                ref_mismatched = sequence_logps(model, batch.mismatched)[0]
            kl = kto_kl_estimate(sequence_logps(model, batch.mismatched)[0], ref_mismatched)
        policy = sequence_logps(model, batch.completions)[0]
        return kto_loss(policy, ref, batch.desirable, kl, self.config.beta, self.config.desirable_weight,
                        self.config.undesirable_weight)[0]


OBJECTIVES = {"sft": TokenObjective, "cpt": TokenObjective, "dpo": DpoObjective, "orpo": OrpoObjective,
              "kto": KtoObjective, "reward": RewardObjective}


def objective_for(config: RunConfig):
    """The objective a run minimizes, with its micro-batch shapes (row and example lengths)."""
    objective = OBJECTIVES[config.objective.name](config.objective, config.training.row_length, config.data.max_length)
    if isinstance(objective, TokenObjective):
        return replace(objective, share_prefixes=shares_prefixes(config.method))
    return objective


def token_objective(row_length: int, share_prefixes: bool = True) -> TokenObjective:
    """Plain SFT over packed rows of `row_length` tokens: what `train` and `evaluate_loss` default to."""
    return TokenObjective(ObjectiveConfig(), row_length, row_length, share_prefixes)


def check_objective_supported(config: RunConfig) -> None:
    """Refuse, before any work, what the objective cannot do with this method or batch."""
    objective = config.objective
    if objective.uses_reference and not freezes_base(config.method):
        raise AfinaError("reference_model_unavailable",
                         f"{objective.name} compares the trained model with its frozen base, but method "
                         f"{config.method.name} trains the base weights themselves", location="objective",
                         hint="use an adapter method (lora, dora, ...), or objective orpo, which needs no reference")
    if objective.name == "kto" and rows_per_step(config.training) < 2:
        raise AfinaError("batch_too_small", "kto estimates its reference point from the other answers of a step, "
                         "so a step needs at least two completions", location="training.rows_per_batch",
                         hint="set training.rows_per_batch x training.gradient_accumulation to 2 or more (8+ is usual)")


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
