"""The shape of a run config. Every model forbids unknown keys; every field says what it is for."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from afina.config.methods import LoraMethod, Method, Strict


class DataConfig(Strict):
    path: str = Field(description="Data file (.jsonl, .json, .csv, .parquet), relative to the config file, "
                                  "or `bundled:tickets` for the example IT-support tickets.")
    validation: float = Field(0.1, ge=0, lt=1, description="Fraction of rows held out for validation during training.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of rows held out for the final base-vs-tuned test.")
    split_seed: int = Field(0, description="Seed of the content-hash split; changing it reshuffles the splits.")
    max_length: int = Field(1024, ge=16, description="Longest example in tokens; longer ones are truncated.")
    train_on_prompt: bool = Field(False, description="Train on every token, not just assistant answers.")
    skip_invalid: bool = Field(False, description="Skip invalid rows (counted in the report) instead of failing.")

    @model_validator(mode="after")
    def _held_out_leaves_training_rows(self) -> "DataConfig":
        if self.validation + self.test >= 0.9:
            raise ValueError("validation + test must leave at least 10% of rows for training")
        return self


class TrainingConfig(Strict):
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    row_length: int = Field(1024, ge=16, description="Tokens per packed row; examples are packed up to this length.")
    rows_per_batch: int = Field(1, ge=1, description="Packed rows per micro-batch (halved automatically on out-of-memory).")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Fraction of steps spent warming up linearly.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto uses bf16 autocast where the hardware runs it fast, else fp32.")
    eval_every: int = Field(50, ge=1, description="Validation loss every N optimizer steps.")
    save_every: int = Field(50, ge=1, description="Checkpoint every N optimizer steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Most recent checkpoints kept on disk.")
    seed: int = Field(0, description="Seed of initialization, data order and dropout.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without improvement; the best checkpoint is kept.")
    early_stopping_min_delta: float = Field(0.0, ge=0, description="Smallest validation-loss drop that counts.")
    max_nonfinite_steps: int = Field(
        3, ge=0, description="Non-finite losses in a row that are skipped before the run stops as diverged.")
    max_time_minutes: float | None = Field(
        None, gt=0, description="Stop with a checkpoint once training has run this long (across resumes).")
    machine: str | None = Field(
        None, description="Machine name in the price table (e.g. aws-p5.48xlarge), for live cost and max_cost.")
    price_per_hour: float | None = Field(None, ge=0, description="Price of the machine per hour; overrides the table.")
    max_cost: float | None = Field(None, gt=0, description="Stop with a checkpoint once the run has cost this much.")

    @model_validator(mode="after")
    def _cost_needs_a_price(self) -> "TrainingConfig":
        if self.max_cost is not None and self.machine is None and self.price_per_hour is None:
            raise ValueError("max_cost needs a price: set training.machine or training.price_per_hour")
        return self


class EvalConfig(Strict):
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer.")
    batch_size: int = Field(16, ge=1, description="Prompts generated at once.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate at most this many test rows.")


class RunConfig(Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name, used in the run directory.")
    model: str = Field("default", description="`default`, a local Hugging Face model directory, or a hub id.")
    data: DataConfig
    method: Method = Field(default_factory=LoraMethod, description="What is trained.")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _method_shorthand(cls, data: object) -> object:
        """`method: lora` is short for `method: {name: lora}`; a method without a name is LoRA."""
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            data = {**data, "method": {"name": data["method"]}}
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {"name": "lora", **data["method"]}}
        return data
