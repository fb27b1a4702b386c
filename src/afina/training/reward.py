"""Reward models: a scalar head on a language model, saved so a later stage can score answers.

    rm = load_reward_model(run_dir)                       # after `afina train` with objective: reward
    score(rm, "the printer is jammed", '{"category": "printer"}')   # -> float, higher is better
    score(rm, [(prompt, answer), ...])                    # -> list[float]

The head is one linear map (no bias: only score differences are trained) from the hidden state at
the answer's last token (its end-of-turn token) to a number, as TRL's reward models read it. A run
saves what its method trained (`save_trained`, e.g. a LoRA adapter) and, beside it,
`reward_head.safetensors` and `reward.json` (hidden size, base model, the objective's settings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from afina.config.schema import RunConfig
from afina.data.preference import tokenize_completion
from afina.data.tokenize import Example
from afina.errors import AfinaError
from afina.models.logprobs import REWARD_HEAD, score_sequences
from afina.models.methods import unwrap
from afina.sealing import load_tensors

HEAD_FILE = "reward_head.safetensors"
INFO_FILE = "reward.json"


def attach_reward_head(model: nn.Module, seed: int = 0) -> nn.Linear:
    """Add a trainable scalar head to `model` (on its transformers model, so `trainable_parameters` and
    checkpoints include it), initialized from `seed` like a sequence-classification score head."""
    hf_model = unwrap(model)
    weight = next(hf_model.parameters())
    head = nn.Linear(hf_model.config.hidden_size, 1, bias=False, device=weight.device, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    std = getattr(hf_model.config, "initializer_range", 0.02)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * std)
    setattr(hf_model, REWARD_HEAD, head)
    return head


def save_reward_head(model: nn.Module, directory: Path, config: RunConfig) -> None:
    """Write the head and what is needed to rebuild it next to the method's saved weights."""
    head = getattr(unwrap(model), REWARD_HEAD)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"weight": head.weight.detach().float().cpu().contiguous()}, directory / HEAD_FILE)
    info = {"hidden_size": head.in_features, "base_model": config.model, "method": config.method.name,
            "objective": config.objective.model_dump(mode="json"), "max_length": config.data.max_length,
            "scored_token": "the answer's end-of-turn token"}
    (directory / INFO_FILE).write_text(json.dumps(info, indent=2))


def load_reward_head(model: nn.Module, directory: Path) -> nn.Linear:
    """Attach the saved head of `directory` to `model` (the tuned model rebuilt by `load_trained`)."""
    path = directory / HEAD_FILE
    if not path.is_file():
        raise AfinaError("artifact_not_found", "no reward head here: the run was not trained with objective: reward",
                         location=str(directory))
    head = attach_reward_head(model)
    weight = load_tensors(path)["weight"]  # decrypted in memory when the run is encrypted
    if weight.shape != head.weight.shape:
        raise AfinaError("artifact_mismatch", f"the reward head expects hidden size {weight.shape[1]}, the model has "
                         f"{head.weight.shape[1]}", location=str(path), hint="load the base model the run used")
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight.device))
    head.requires_grad_(False)
    return head


@dataclass
class RewardModel:
    """A tuned model with its reward head and tokenizer, ready to score (prompt, completion) pairs."""

    model: nn.Module
    tokenizer: object
    max_length: int
    row_length: int = 4096


def load_reward_model(run_dir: str | Path) -> RewardModel:
    """The reward model a run trained: its base model, what the method trained, and the head."""
    from afina.models.artifacts import load_trained
    from afina.models.loading import load_model, load_tokenizer

    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise AfinaError("run_not_found", "not a run directory (no config.json)", location=str(run_dir))
    config = RunConfig.model_validate_json(config_path.read_text())
    if config.objective.name != "reward":
        raise AfinaError("not_a_reward_model", f"this run trained objective {config.objective.name}, not reward",
                         location=str(config_path))
    base = load_model(config.model)
    attach_reward_head(base)  # full runs saved the head among the model's parameters: give it a place
    model = load_trained(base, run_dir / "adapter")
    load_reward_head(model, run_dir / "adapter")
    model.eval()
    return RewardModel(model, load_tokenizer(config.model), config.data.max_length)


@torch.no_grad()
def score(reward_model: RewardModel, prompt: str | list[dict] | list[tuple], completion: str | None = None,
          batch_size: int = 16) -> float | list[float]:
    """Score one (prompt, completion) pair, or a list of pairs; a prompt is a string (one user
    message) or a list of chat messages. Long prompts are cut from the left, as in training."""
    if completion is not None:
        return score(reward_model, [(prompt, completion)], batch_size=batch_size)[0]
    pad_id = reward_model.tokenizer.pad_token_id
    examples = []
    for line, (question, answer) in enumerate(prompt, start=1):
        messages = [{"role": "user", "content": question}] if isinstance(question, str) else list(question)
        tokenized = tokenize_completion(reward_model.tokenizer, messages, answer, line)
        keep = max(1, reward_model.max_length - len(tokenized.answer_ids))
        example = tokenized.example()
        cut = max(0, len(tokenized.prompt_ids) - keep)
        examples.append(Example(example.input_ids[cut:], example.trained[cut:], line, cut > 0))
    scores: list[float] = []
    for start in range(0, len(examples), batch_size):
        part = examples[start : start + batch_size]
        scores.extend(score_sequences(reward_model.model, part, reward_model.row_length, pad_id).tolist())
    return scores
