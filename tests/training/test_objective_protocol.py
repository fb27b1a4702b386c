"""A new objective is one class: the loop, validation and evaluation take it as it is."""

from dataclasses import dataclass, replace

import torch

from afina.config.schema import ObjectiveConfig
from afina.training.validation import evaluate_loss
from afina.training.loop import train
from afina.training.losses import sft_loss_sum
from afina.training.objectives import TokenObjective, token_objective
from tests.training.test_training import QUIET, config, examples, lora_model


@dataclass(frozen=True)
class FirstAnswerTokensObjective(TokenObjective):
    """A toy objective: cross-entropy of only the first trained token of each packed row, per row."""

    name = "first_answer_token"
    reads = ("chat",)

    def count(self, batch) -> int:
        return batch.input_ids.shape[0]

    def loss_sum(self, model, batch) -> torch.Tensor:
        targets = batch.targets.clone()
        first = (targets != -100).int().argmax(dim=1)
        keep = torch.zeros_like(targets, dtype=torch.bool)
        keep[torch.arange(targets.shape[0]), first] = True
        targets[~keep] = -100
        return sft_loss_sum(model, replace(batch, targets=targets))


def test_a_toy_objective_trains_and_validates_through_the_protocol(tiny_model_dir, tiny_tokenizer, ticket_rows,
                                                                   tmp_path):
    data = examples(tiny_tokenizer, ticket_rows)
    toy = FirstAnswerTokensObjective(ObjectiveConfig(), 256, 512)
    model = lora_model(tiny_model_dir)
    pad = tiny_tokenizer.pad_token_id
    before, rows = evaluate_loss(model, data, toy, 1, pad)
    result = train(model, data, data[:8], config(max_steps=12, learning_rate=2e-2), tmp_path / "run", pad, QUIET,
                   objective=toy)
    after, _ = evaluate_loss(model, data, toy, 1, pad)
    assert result.steps == 12 and after < before
    assert rows == len(toy.items(data))  # averaged over rows, as its count says, not over tokens
    assert evaluate_loss(model, data, token_objective(256), 1, pad)[1] > rows  # SFT counts every trained token
