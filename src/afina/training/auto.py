"""`auto` training settings: row length, epochs, examples per step and learning rate chosen from the data.

    values, reasons = choose_hyperparameters(train_examples, config.method, config.training)

The rule follows the OpenAI fine-tuning API's `auto` (3 epochs, more for small data and fewer for
large, a batch of about 0.2% of the examples, a learning rate that grows with the batch), but counts
optimizer steps rather than examples: afina packs many short examples into one row, so a small data
set that OpenAI would train for hundreds of steps takes a few dozen here, and stops learning there.
Small data therefore gets shorter rows first, then more epochs.

- row length (`row_length`): 2048 tokens, unless an epoch of such rows would hold too few steps.
  Then the longest multiple of 64 tokens whose rows hold about one step's examples (per micro-batch
  and accumulation, the latter taken as 1 while `auto`): the examples per step below, or more where
  the data has enough examples for 100 steps in 3 epochs (3% of the examples per step). Never
  shorter than the longest example. A 2048-token row of examples sharing a long system prompt holds
  about 50 of them (the prompt is held once per row), so 100 such examples would otherwise make 2
  steps an epoch; rows of about 8 make 13, each computing the prompt once more.
- examples per step (`gradient_accumulation`): about 0.2% of the training examples, at least 8 and at
  most 256, rounded to whole micro-batches (`rows_per_batch` items each), at least one. A small data
  set gets the smallest step, one micro-batch, which leaves the most optimizer steps.
- epochs: 3; fewer where 3 passes would train more than 25,000 examples (down to 1); more, up to 10,
  where 3 epochs would take fewer than 100 optimizer steps.
- learning rate: the method's usual rate at 8 examples per step, times sqrt(examples per step / 8),
  at most 5 times the usual rate (LoRA: 2e-4 to 1e-3; full fine-tuning 2e-5 to 1e-4). An AdamW step
  averages the gradient of its examples, so a larger step is less noisy and takes a larger rate.

An item is what a step is cut from (`afina.training.objectives`): a packed row of examples (sft,
cpt) or one pair or completion (their `auto` row length is 2048); examples per step = items per
step x examples per item. A field given as a number is never changed, and the others are chosen
from it. The values are chosen before the run directory is written, so the run's config.json holds
numbers and a resumed run keeps them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from afina.config.methods import MethodConfig
from afina.config.schema import TrainingConfig
from afina.data.packing import pack_examples
from afina.data.tokenize import Example

TARGET_EPOCHS = 3
MAX_EPOCHS = 10
MIN_STEPS = 100  # optimizer steps a run should take at least (within MAX_EPOCHS)
MAX_EXAMPLES_TRAINED = 25_000  # example passes beyond which epochs fall below TARGET_EPOCHS
STEP_SHARE = 0.002  # examples per step, as a share of the training examples
MIN_EXAMPLES_PER_STEP, MAX_EXAMPLES_PER_STEP = 8, 256
REFERENCE_EXAMPLES_PER_STEP = 8  # the step the methods' usual rates below are given for
MAX_RATE_FACTOR = 5
LONGEST_ROW = 2048  # `row_length: auto` where the data fills enough steps without shorter rows
ROW_LENGTH_MULTIPLE = 64  # an `auto` row length is a multiple of this


def wanted_examples_per_step(count: int) -> int:
    """The rule's examples per step for `count` training examples: 0.2%, within its bounds."""
    return min(MAX_EXAMPLES_PER_STEP, max(MIN_EXAMPLES_PER_STEP, round(STEP_SHARE * count)))


def count_items(examples: Sequence, method: MethodConfig, training: TrainingConfig,
                row_length: int | None = None) -> int:
    """How many items an epoch of `examples` is cut into: packed rows of tokenized examples, as the
    objective packs them (`afina.data.packing.pack_examples`) into rows of `row_length` (default
    `training.row_length`), else one item per unit."""
    if examples and isinstance(examples[0], Example):
        return len(pack_examples(list(examples), row_length or training.row_length, method.shares_prefixes))
    return len(examples)


def choose_row_length(examples: Sequence, method: MethodConfig, training: TrainingConfig) -> tuple[int, int, str]:
    """`row_length: auto`: the longest row (`LONGEST_ROW`) unless an epoch of such rows would hold too
    few optimizer steps; then the longest multiple of `ROW_LENGTH_MULTIPLE` whose rows hold about
    one step's examples: the rule's examples per step, or more where the data has enough examples for
    `MIN_STEPS` steps in `TARGET_EPOCHS` epochs. Never shorter than the longest example. Returns the
    length, the rows an epoch packs into at that length, and the reason."""
    if not (examples and isinstance(examples[0], Example)):
        return LONGEST_ROW, len(examples), f"{LONGEST_ROW} tokens: pairs and completions are one item each, not packed"
    count = len(examples)
    longest = max(len(e.input_ids) for e in examples)
    shortest = -(-longest // ROW_LENGTH_MULTIPLE) * ROW_LENGTH_MULTIPLE
    top = max(shortest, LONGEST_ROW)
    accumulation = 1 if training.gradient_accumulation == "auto" else training.gradient_accumulation
    items_per_step = training.rows_per_batch * accumulation
    per_step = max(wanted_examples_per_step(count), count * TARGET_EPOCHS / MIN_STEPS)
    rows_wanted = math.ceil(count * items_per_step / per_step)  # rows of about per_step / items_per_step examples
    rows_at = {top: count_items(examples, method, training, top)}
    if rows_at[top] >= rows_wanted:
        return top, rows_at[top], f"{top} tokens: {rows_at[top]} rows, enough for {per_step:.0f} examples per step at most"
    low, high = shortest, top  # rows_at(low) >= rows_wanted > rows_at(high) once low is checked
    rows_at[low] = count_items(examples, method, training, low)
    if rows_at[low] < rows_wanted:
        return low, rows_at[low], (f"{low} tokens, the longest example's {longest} rounded up: {rows_at[low]} rows "
                     f"({count / rows_at[low]:.1f} examples each, {per_step / items_per_step:.1f} wanted)")
    while high - low > ROW_LENGTH_MULTIPLE:
        middle = (low + high) // 2 // ROW_LENGTH_MULTIPLE * ROW_LENGTH_MULTIPLE
        rows_at[middle] = count_items(examples, method, training, middle)
        low, high = (middle, high) if rows_at[middle] >= rows_wanted else (low, middle)
    return low, rows_at[low], (f"{low} tokens: {rows_at[low]} rows of {count / rows_at[low]:.1f} examples, about "
                 f"{per_step / items_per_step:.1f} wanted ({per_step:.0f} examples per step: "
                 f"{wanted_examples_per_step(count)} by the step rule, {count * TARGET_EPOCHS / MIN_STEPS:.0f} for "
                 f"{MIN_STEPS} steps in {TARGET_EPOCHS} epochs); {top}-token rows give only {rows_at[top]}")


def choose_hyperparameters(examples: Sequence, method: MethodConfig,
                           training: TrainingConfig) -> tuple[dict[str, float | int], dict[str, str]]:
    """The values of the training fields set to `auto` (`TrainingConfig.auto_fields`), chosen from the
    training units (tokenized examples, pairs or completions), and a reason for each. Fields given as
    numbers are read, never changed. Pure: the same data and config give the same choice."""
    auto = set(training.auto_fields())
    count = max(1, len(examples))
    values: dict[str, float | int] = {}
    reasons: dict[str, str] = {}

    if "row_length" in auto:
        values["row_length"], items, reasons["row_length"] = choose_row_length(examples, method, training)
    else:
        items = count_items(examples, method, training)
    items = max(1, items)
    per_item = count / items  # examples in a packed row; 1 for pairs and completions

    accumulation = training.gradient_accumulation
    if "gradient_accumulation" in auto:
        wanted = wanted_examples_per_step(count)
        accumulation = max(1, round(wanted / (training.rows_per_batch * per_item)))
        values["gradient_accumulation"] = accumulation
        reasons["gradient_accumulation"] = (
            f"{wanted} examples per step wanted (0.2% of {count}, {MIN_EXAMPLES_PER_STEP} to "
            f"{MAX_EXAMPLES_PER_STEP}); {training.rows_per_batch} x {accumulation} items of {per_item:.1f} "
            f"examples give {training.rows_per_batch * accumulation * per_item:.0f}")
    items_per_step = training.rows_per_batch * accumulation
    examples_per_step = items_per_step * per_item
    steps_per_epoch = math.ceil(items / items_per_step)

    if "epochs" in auto:
        epochs, why = TARGET_EPOCHS, f"{TARGET_EPOCHS} epochs"
        if TARGET_EPOCHS * count > MAX_EXAMPLES_TRAINED:
            epochs = max(1, MAX_EXAMPLES_TRAINED // count)
            why = f"{count} examples: {epochs} epoch(s) train at most {MAX_EXAMPLES_TRAINED:,} examples"
        elif TARGET_EPOCHS * steps_per_epoch < MIN_STEPS:
            epochs = min(MAX_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch))
            why = (f"{TARGET_EPOCHS} epochs would take only {TARGET_EPOCHS * steps_per_epoch} steps; {epochs} "
                   f"epochs take {epochs * steps_per_epoch} (at least {MIN_STEPS} wanted, at most {MAX_EPOCHS} epochs)")
        values["epochs"] = float(epochs)
        reasons["epochs"] = (f"{why}; {steps_per_epoch} steps per epoch ({items} items of "
                             f"{per_item:.1f} examples, {items_per_step} per step)")
        if training.max_steps:
            reasons["epochs"] += f"; training.max_steps={training.max_steps} stops the run first if smaller"

    if "learning_rate" in auto:
        usual = method.usual_learning_rate
        factor = min(MAX_RATE_FACTOR, max(1.0, math.sqrt(examples_per_step / REFERENCE_EXAMPLES_PER_STEP)))
        rate = float(f"{usual * factor:.2g}")
        values["learning_rate"] = rate
        reasons["learning_rate"] = (f"{method.name}'s usual {usual:g} at {REFERENCE_EXAMPLES_PER_STEP} examples per step, "
                                    f"x{factor:.2f} for {examples_per_step:.0f} per step (at most x{MAX_RATE_FACTOR})")
    return values, reasons


def resolve_auto(training: TrainingConfig, examples: Sequence, method: MethodConfig) -> tuple[TrainingConfig, list[str]]:
    """`training` with its `auto` fields replaced by the chosen numbers (validated as if the user had
    written them), and one printable line per choice; `training` itself when nothing is `auto`."""
    if not training.auto_fields():
        return training, []
    values, reasons = choose_hyperparameters(examples, method, training)
    resolved = TrainingConfig.model_validate({**training.model_dump(), **values})
    return resolved, [f"training.{name}: auto -> {values[name]:g} ({reasons[name]})" for name in values]
