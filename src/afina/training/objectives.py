"""What the one training loop minimizes: one class per objective, behind the `Objective` protocol.

    objective = objective_for(config)                  # OBJECTIVES[config.objective.name].from_config(config)
    units = objective.tokenize(records, tokenizer)     # what one row of data becomes
    for items in objective.epoch_steps(units, training, epoch):        # one optimizer step each
        for batch in micro-batches of items:                             # cut by the loop
            loss = objective.loss_sum(model, batch) / (sum of objective.count over the step's batches)
    base, tuned = evaluate_objective(objective, model, ...)       # afina.eval.compare: both models on the test split

| objective | reads | a unit | an item (micro-batches are cut from these) | count (denominator) |
| --- | --- | --- | --- | --- |
| sft | chat rows | `Example` | a packed row of examples | trained tokens |
| cpt | text rows | `Example` (a block) | a packed row of blocks | trained tokens |
| dpo, orpo, reward | preference rows | `PreferencePair` | a pair | pairs |
| kto | preference or unpaired rows | `KtoExample` | an example and its mismatched completion | completions |

Everything an objective is (the rows it reads, how it tokenizes and batches, its loss, what its
test evaluation measures and the metrics it derives from that, what it adds to the model, what the
estimate may assume) is in its class; the loop, the pipeline, evaluation and the estimate only call
the protocol. `training.rows_per_batch` is the
items of one micro-batch, halved on out of memory; an optimizer step always holds
`rows_per_batch x gradient_accumulation` items. Each epoch's steps are a pure function of
(units, seed, epoch), which is what makes resuming exact.

dpo and kto need the reference model: the frozen base of an adapter run, computed by the same
model inside `base_model(model)` (no second copy), so they refuse methods that train the base.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch

from afina.config.gate import FIELD_PREFIX, metric_base_name
from afina.config.schema import ObjectiveConfig, RunConfig, TrainingConfig
from afina.data.cpt import cpt_examples
from afina.data.packing import Batch, collate_rows, epoch_steps, pack_examples, row_sizes
from afina.data.preference import (KtoBatch, SequenceBatch, collate_kto, collate_pairs, kto_examples,
                                   mismatched_completions, tokenize_preferences)
from afina.data.records import Record
from afina.data.tokenize import tokenize_records
from afina.errors import AfinaError
from afina.models.logprobs import reward_scores, sequence_logps
from afina.models.methods import base_model
from afina.training.losses import dpo_loss, kto_kl_estimate, kto_loss, orpo_loss, reward_loss, sft_loss_sum
from afina.training.reward import attach_reward_head, load_reward_head, save_reward_head

class Objective(Protocol):
    """What the loop, the pipeline, evaluation and the estimate ask of an objective."""

    name: str
    reads: ClassVar[tuple[str, ...]]  # the record kinds it trains on
    packs_tokens: ClassVar[bool]  # items are packed rows of tokens (what the memory estimate models)
    uses_reference: ClassVar[bool]  # compares the trained model with its frozen base
    measures: ClassVar[dict]  # what the test evaluation measures of preference data (`measure_preferences`)
    gate_metrics: ClassVar[tuple[str, ...]]  # the metrics its evaluation scores per test row, which a gate can pair

    def check(self, config: RunConfig) -> None: ...
    def tokenize(self, records: list[Record], tokenizer, path: str = "") -> list: ...
    def items(self, units: list) -> list: ...
    def epoch_steps(self, units: list, training: TrainingConfig, epoch: int) -> list[list]: ...
    def collate(self, items: list, pad_id: int): ...
    def count(self, batch) -> int: ...
    def loss_sum(self, model, batch) -> torch.Tensor: ...
    def prepare_model(self, model, seed: int) -> None: ...
    def save_extras(self, model, directory: Path, config: RunConfig) -> None: ...
    def load_extras(self, model, directory: Path) -> None: ...
    def add_test_metrics(self, base: dict, tuned: dict, measures) -> None: ...


# what greedy answers are scored on, per test row with a reference answer (`afina.eval.metrics`)
GENERATION_METRICS = ("exact_match", "rouge_l", "json_valid", "field_accuracy_mean", FIELD_PREFIX)


def rows_per_step(config: TrainingConfig) -> int:
    """Items (packed rows, pairs or completions) in one optimizer step."""
    return config.rows_per_batch * config.gradient_accumulation


def shuffled_steps(items: Sequence, per_step: int, seed: int, epoch: int) -> list[list]:
    """`items` shuffled by (seed, epoch) as `epoch_steps` shuffles examples, `per_step` at a time."""
    order = list(items)
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return [order[i : i + per_step] for i in range(0, len(order), per_step)]


@dataclass(frozen=True)
class BaseObjective:
    """What every objective shares: its settings, and the defaults of the protocol's optional parts."""

    config: ObjectiveConfig
    row_length: int
    max_length: int
    share_prefixes: bool = True
    train_on_prompt: bool = False

    name: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()
    rows: ClassVar[str] = ""  # how an error names the rows it reads
    packs_tokens: ClassVar[bool] = False
    uses_reference: ClassVar[bool] = False
    measures: ClassVar[dict] = {}
    gate_metrics: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_config(cls, config: RunConfig) -> "BaseObjective":
        return cls(config.objective, config.training.row_length, config.data.max_length,
                   config.method.shares_prefixes, config.data.train_on_prompt)

    def check(self, config: RunConfig) -> None:
        """Refuse, before any work, what the objective cannot do with this method or batch."""
        if self.uses_reference and not config.method.freezes_base:
            raise AfinaError("reference_model_unavailable",
                             f"{self.name} compares the trained model with its frozen base, but method "
                             f"{config.method.name} trains the base weights themselves", location="objective",
                             hint="use an adapter method (lora, dora, ...), or objective orpo, which needs no reference")

    def check_gate(self, config: RunConfig) -> None:
        """Refuse, before any work, a gate or guard on a metric this objective's evaluation does not
        score per test row (`afina run` compares base and tuned row by row)."""
        gated = [("gate.metric", config.gate.metric)] + [(f"gate.guards.{i}.metric", guard.metric)
                                                         for i, guard in enumerate(config.gate.guards)]
        for location, metric in gated:
            name = metric_base_name(metric)
            if name not in self.gate_metrics and not (name.startswith(FIELD_PREFIX) and FIELD_PREFIX in self.gate_metrics):
                raise AfinaError("gate_metric_unavailable", f"objective {self.name} does not score {name} per test row",
                                 location=location, hint="use one of: " + ", ".join(f"{m}<key>" if m == FIELD_PREFIX else m
                                                                 for m in self.gate_metrics))

    def check_rows(self, records: list[Record], path: str = "") -> None:
        """Refuse rows the objective cannot read, naming the first one."""
        wrong = next((r for r in records if r.kind not in self.reads), None)
        if wrong is not None:
            raise AfinaError("wrong_data_for_objective", f"objective {self.name} reads {self.rows} rows, not "
                             f"{wrong.kind} rows", location=f"{path}:{wrong.line}",
                             hint="use objective: sft for chat data, cpt for text, dpo/orpo/kto/reward for preferences")

    def prepare_model(self, model, seed: int) -> None:
        """Add what the objective trains beside the method (a reward head); nothing by default."""

    def save_extras(self, model, directory: Path, config: RunConfig) -> None:
        """Write what `prepare_model` added next to the method's saved weights."""

    def load_extras(self, model, directory: Path) -> None:
        """Put back what `save_extras` wrote onto the rebuilt tuned model."""

    def add_test_metrics(self, base: dict, tuned: dict, measures) -> None:
        """The objective's own test metrics (its loss, implicit rewards), from what the evaluation
        measured of the base and the tuned model (`afina.eval.preference.PreferenceMeasures`)."""


# --- packed tokens --------------------------------------------------------------------------------

@dataclass(frozen=True)
class TokenObjective(BaseObjective):
    """Summed cross-entropy of the trained tokens of packed rows, per trained token. With
    `share_prefixes` (every method but those acting at each example's own positions), examples read
    the prefix they share with their row's first example instead of holding it
    (`afina.data.packing`): a row holds more examples for the same positions computed."""

    packs_tokens: ClassVar[bool] = True

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
        return sft_loss_sum(model, batch)


class SftObjective(TokenObjective):
    """Supervised fine-tuning: the assistant answers of chat rows (every token with `train_on_prompt`)."""

    name = "sft"
    reads = ("chat",)
    rows = "chat"
    gate_metrics = ("loss", *GENERATION_METRICS)

    def check_rows(self, records: list[Record], path: str = "") -> None:
        """Nothing up front: tokenization names what is wrong with a row more precisely."""

    def tokenize(self, records: list[Record], tokenizer, path: str = "") -> list:
        return tokenize_records(records, tokenizer, self.max_length, self.train_on_prompt, path)


class CptObjective(TokenObjective):
    """Continued pretraining: raw documents cut into overlapping blocks, every token trained once."""

    name = "cpt"
    reads = ("text",)
    rows = "`text`"
    gate_metrics = ("loss",)

    def tokenize(self, records: list[Record], tokenizer, path: str = "") -> list:
        self.check_rows(records, path)
        return cpt_examples(records, tokenizer, self.config.block_length, self.config.overlap)


def token_objective(row_length: int, share_prefixes: bool = True) -> SftObjective:
    """Plain SFT over packed rows of `row_length` tokens."""
    return SftObjective(ObjectiveConfig(), row_length, row_length, share_prefixes)


# --- preference pairs -----------------------------------------------------------------------------

@dataclass(frozen=True)
class PairObjective(BaseObjective):
    """Shared by the objectives that read preference pairs; one pair is one item and one count."""

    reads: ClassVar[tuple[str, ...]] = ("preference",)
    rows: ClassVar[str] = "prompt/chosen/rejected"
    gate_metrics: ClassVar[tuple[str, ...]] = ("preference_accuracy", "logp_margin", *GENERATION_METRICS)

    def tokenize(self, records: list[Record], tokenizer, path: str = "") -> list:
        self.check_rows(records, path)
        return tokenize_preferences(records, tokenizer, self.max_length, path)

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

    name = "dpo"
    uses_reference = True

    def loss_sum(self, model, batch: SequenceBatch) -> torch.Tensor:
        with torch.no_grad(), base_model(model):
            ref_chosen, ref_rejected = sequence_logps(model, batch)[0].chunk(2)
        chosen, rejected = sequence_logps(model, batch)[0].chunk(2)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, self.config.beta, self.config.label_smoothing)[0]

    def add_test_metrics(self, base: dict, tuned: dict, m) -> None:
        if m.pairs:
            tuned.update(implicit_reward_metrics(m, self.config.beta))
            b, t = m.base_pairs, m.tuned_pairs
            smoothing = self.config.label_smoothing
            base["loss"] = float(dpo_loss(b["chosen"], b["rejected"], b["chosen"], b["rejected"], self.config.beta,
                                          smoothing)[0]) / m.pairs
            tuned["loss"] = float(dpo_loss(t["chosen"], t["rejected"], b["chosen"], b["rejected"], self.config.beta,
                                           smoothing)[0]) / m.pairs


class OrpoObjective(PairObjective):
    """ORPO (`orpo_loss`): NLL of the chosen answer plus the odds-ratio term, per pair; no reference."""

    name = "orpo"

    def loss_sum(self, model, batch: SequenceBatch) -> torch.Tensor:
        sums, counts = sequence_logps(model, batch)
        return orpo_loss(*(sums / counts.clamp(min=1)).chunk(2), beta=self.config.beta)[0]

    def add_test_metrics(self, base: dict, tuned: dict, m) -> None:
        if m.pairs:
            tuned.update(implicit_reward_metrics(m, self.config.beta))
            for result, measured in ((base, m.base_pairs), (tuned, m.tuned_pairs)):
                means = [measured[k] / measured[f"{k}_tokens"].clamp(min=1) for k in ("chosen", "rejected")]
                result["loss"] = float(orpo_loss(*means, beta=self.config.beta)[0]) / m.pairs


class RewardObjective(PairObjective):
    """A reward model: the scalar head on each answer's last token, pairwise loss (`reward_loss`), per pair.
    The head is trained beside the method's weights and saved next to them (`afina.training.reward`)."""

    name = "reward"
    # a reward model answers with scores, not text; its base, with no head, by log-prob margins
    measures = {"scores": True, "generate": False}
    gate_metrics = ("preference_accuracy", "logp_margin")

    def loss_sum(self, model, batch: SequenceBatch) -> torch.Tensor:
        chosen, rejected = reward_scores(model, batch).chunk(2)
        margin = torch.full_like(chosen, self.config.margin) if self.config.margin else None
        return reward_loss(chosen, rejected, margin, self.config.center_coefficient)

    def prepare_model(self, model, seed: int) -> None:
        attach_reward_head(model, seed)

    def save_extras(self, model, directory: Path, config: RunConfig) -> None:
        save_reward_head(model, directory, config)

    def load_extras(self, model, directory: Path) -> None:
        load_reward_head(model, directory)

    def add_test_metrics(self, base: dict, tuned: dict, m) -> None:
        if m.pairs:
            chosen, rejected = m.tuned_pairs["score"].chunk(2)
            margin = torch.full_like(chosen, self.config.margin) if self.config.margin else None
            tuned.update(loss=float(reward_loss(chosen, rejected, margin, self.config.center_coefficient)) / m.pairs,
                         preference_accuracy=share(chosen > rejected), score_margin=float((chosen - rejected).mean()),
                         accuracy_from="reward scores")
            tuned["per_example"]["preference_accuracy"] = (chosen > rejected).float().tolist()
            base["accuracy_from"] = "log-prob margin (the base has no reward head)"


# --- labelled completions -------------------------------------------------------------------------

@dataclass(frozen=True)
class KtoItem:
    """A KTO example and its mismatched completion (its prompt with another example's answer)."""

    example: object  # KtoExample
    mismatched: object  # Completion


@dataclass(frozen=True)
class KtoObjective(BaseObjective):
    """KTO against the frozen base (`kto_loss`), per completion.

    The KL reference point z0 is estimated per micro-batch, as TRL does, from mismatched completions
    paired within the optimizer step (prompt i with answer i-1), so a micro-batch of one, after an
    out-of-memory halving, still pairs its prompt with another answer.
    """

    name: ClassVar[str] = "kto"
    reads: ClassVar[tuple[str, ...]] = ("preference", "unpaired")
    rows: ClassVar[str] = "prompt/chosen/rejected or prompt/completion/label"
    uses_reference: ClassVar[bool] = True
    measures: ClassVar[dict] = {"completions": True}
    gate_metrics: ClassVar[tuple[str, ...]] = ("preference_accuracy", "logp_margin", *GENERATION_METRICS)

    def check(self, config: RunConfig) -> None:
        super().check(config)
        if rows_per_step(config.training) < 2:
            raise AfinaError("batch_too_small", "kto estimates its reference point from the other answers of a step, "
                             "so a step needs at least two completions", location="training.rows_per_batch",
                             hint="set training.rows_per_batch x training.gradient_accumulation to 2 or more (8+ is usual)")

    def tokenize(self, records: list[Record], tokenizer, path: str = "") -> list:
        self.check_rows(records, path)
        return kto_examples(records, tokenizer, self.max_length, path)

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

    def add_test_metrics(self, base: dict, tuned: dict, m) -> None:
        completions = len(m.tuned_completions["logps"])
        if m.pairs:
            tuned.update(implicit_reward_metrics(m, self.config.beta))
        reference = m.base_completions
        for result, measured in ((base, m.base_completions), (tuned, m.tuned_completions)):
            kl = kto_kl_estimate(measured["mismatched"], reference["mismatched"])
            result["loss"] = float(kto_loss(measured["logps"], reference["logps"], measured["desirable"], kl,
                                            self.config.beta, self.config.desirable_weight,
                                            self.config.undesirable_weight)[0]) / completions
        rewards = self.config.beta * (m.tuned_completions["logps"] - reference["logps"])
        desirable = m.tuned_completions["desirable"]
        tuned.update(completion_reward_accuracy=share(torch.where(desirable, rewards > 0, rewards < 0)),
                     completions=completions)


OBJECTIVES: dict[str, type[BaseObjective]] = {
    "sft": SftObjective, "cpt": CptObjective, "dpo": DpoObjective, "orpo": OrpoObjective, "kto": KtoObjective,
    "reward": RewardObjective}


def share(flags: torch.Tensor) -> float:
    """The share of True among `flags` (0 for none)."""
    return float(flags.float().mean()) if flags.numel() else 0.0


def implicit_reward_metrics(measures, beta: float) -> dict:
    """The tuned model against its base as reference: beta * ((log pi - log ref)(chosen) - (...)(rejected))
    per pair, positive when tuning moved probability towards the chosen answer."""
    base, tuned = measures.base_pairs, measures.tuned_pairs
    implicit = beta * ((tuned["chosen"] - base["chosen"]) - (tuned["rejected"] - base["rejected"]))
    return {"reward_accuracy": share(implicit > 0), "reward_margin": float(implicit.mean())}


def objective_for(config: RunConfig) -> BaseObjective:
    """The objective a run minimizes, with its micro-batch shapes (row and example lengths)."""
    return OBJECTIVES[config.objective.name].from_config(config)
