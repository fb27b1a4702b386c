"""The shape of a run config. Every model forbids unknown keys; every field says what it is for."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PlainValidator, TypeAdapter, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from afina.config.gate import GateConfig, NotifyConfig
from afina.config.methods import LoraMethod, Method, Strict


class DataConfig(Strict):
    path: str | None = Field(None, description="Data file (.jsonl, .json, .csv, .parquet), relative to the config "
                                               "file (typed as an override: to the current directory), or "
                                               "`bundled:tickets` for the example IT-support tickets. "
                                               "Leave out when `datasets` lists several files.")
    validation: float = Field(0.1, ge=0, lt=1, description="Fraction of rows held out for validation during training "
                                                           "(not used with validation_path).")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of rows held out for the final base-vs-tuned test "
                                                     "(not used with test_path).")
    test_path: str | None = Field(None, description="A file used as the test split as it is, instead of cutting one "
                                                    "from `path` (same formats and checks; relative to the config "
                                                    "file). Rows it shares with the training rows are reported as "
                                                    "a test_overlap warning.")
    validation_path: str | None = Field(None, description="A file used as the validation split as it is, instead "
                                                          "of cutting one from `path`.")
    split_seed: int = Field(0, description="Seed of the content-hash split; changing it reshuffles the splits.")
    max_length: int = Field(1024, ge=16, description="Longest example in tokens; longer ones are truncated.")
    train_on_prompt: bool = Field(False, description="Train on every token, not just assistant answers.")
    skip_invalid: bool = Field(False, description="Skip invalid rows (counted in the report) instead of failing.")
    mask_pii: bool = Field(False, description="Replace personal data (e-mails, phones, IBANs, cards, DNI/NIE, NIF, "
                                              "CPF, SSN, IPs) with typed placeholders such as <EMAIL_1> as the data "
                                              "is read, before splitting: the originals never reach a split file, "
                                              "a checkpoint or the store. `afina data scan` shows what it finds.")

    @model_validator(mode="after")
    def _held_out_leaves_training_rows(self) -> "DataConfig":
        if self.validation + self.test >= 0.9:
            raise ValueError("validation + test must leave at least 10% of rows for training")
        return self


def number_or_auto(kind: type, **bounds) -> object:
    """The type of a field that takes a number within `bounds` or the word `auto` (chosen from the data
    before training by `afina.training.auto`); one error per bad value, naming both."""
    number = TypeAdapter(Annotated[kind, Field(**bounds)])

    def validate(value: object) -> object:
        if value == "auto":
            return value
        try:
            return number.validate_python(value)
        except ValidationError as error:
            raise PydanticCustomError("number_or_auto", "{problem}, or auto",
                                      {"problem": error.errors()[0]["msg"]}) from None

    return Annotated[kind | Literal["auto"], PlainValidator(validate, json_schema_input_type=kind | Literal["auto"])]


AUTO_FIELDS = ("row_length", "epochs", "gradient_accumulation", "learning_rate")  # the fields that take `auto`


class TrainingConfig(Strict):
    epochs: number_or_auto(float, gt=0) = Field(
        1.0, description="Passes over the training split (fractions allowed), or `auto`: 3, more for small data "
                         "(enough optimizer steps), fewer for large (afina.training.auto).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    row_length: number_or_auto(int, ge=16) = Field(
        1024, description="Tokens per packed row; examples are packed up to this length. Or `auto`: 2048, shorter for "
                          "small data so that a row holds about one step's examples (afina.training.auto).")
    rows_per_batch: int = Field(1, ge=1, description="Packed rows per micro-batch (halved automatically on out-of-memory).")
    gradient_accumulation: number_or_auto(int, ge=1) = Field(
        1, description="Micro-batches per optimizer step, or `auto`: about 0.2% of the training examples per step, "
                       "8 to 256 (afina.training.auto).")
    learning_rate: number_or_auto(float, gt=0) = Field(
        2e-4, description="Peak learning rate of AdamW, or `auto`: the method's usual rate, raised with the "
                          "examples per step (afina.training.auto).")
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
        None, gt=0, description="Stop with a checkpoint before a step that would end past this much training time "
        "(across resumes; judged by the mean step so far).")
    machine: str | None = Field(
        None, description="Machine name in the price table (e.g. aws-p5.48xlarge), for live cost and max_cost.")
    price_per_hour: float | None = Field(None, ge=0, description="Price of the machine per hour; overrides the table.")
    max_cost: float | None = Field(None, gt=0, description="Stop with a checkpoint once the run has cost this much.")
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto", description="Under several processes (torchrun, or afina train --devices N): ddp keeps the whole "
                            "model on each device and splits the data; fsdp also shards weights, gradients and "
                            "optimizer state across devices; auto picks ddp when the run fits one device, "
                            "fsdp otherwise. One process ignores it.")
    fsdp_activation_checkpointing: bool = Field(
        False, description="fsdp: recompute each decoder layer's activations in backward instead of keeping them "
                           "(less memory, about a third more compute). Set with parallel auto, it makes auto fsdp.")
    fsdp_cpu_offload: bool = Field(
        False, description="fsdp: keep the weight shards, their gradients and the optimizer state in CPU memory; "
                           "each layer's weights are copied to the device while it computes and AdamW steps on the "
                           "CPU (fits a larger model, runs slower). Set with parallel auto, it makes auto fsdp.")

    def auto_fields(self) -> list[str]:
        """The fields still set to `auto` (none once the run's data has chosen them)."""
        return [name for name in AUTO_FIELDS if getattr(self, name) == "auto"]

    @model_validator(mode="after")
    def _cost_needs_a_price(self) -> "TrainingConfig":
        if self.max_cost is not None and self.machine is None and self.price_per_hour is None:
            raise ValueError("max_cost needs a price: set training.machine or training.price_per_hour")
        fsdp_only = [name for name in ("fsdp_activation_checkpointing", "fsdp_cpu_offload") if getattr(self, name)]
        if fsdp_only and self.parallel == "ddp":
            raise ValueError(f"{' and '.join(fsdp_only)} need parallel fsdp (or auto), not ddp")
        return self


OBJECTIVE_FIELDS = {"beta": ("dpo", "orpo", "kto"), "label_smoothing": ("dpo",),
                    "desirable_weight": ("kto",), "undesirable_weight": ("kto",),
                    "margin": ("reward",), "center_coefficient": ("reward",)}


class ObjectiveConfig(Strict):
    name: Literal["sft", "cpt", "dpo", "orpo", "kto", "reward"] = Field(
        "sft", description="sft: learn the answers of chat rows; cpt: continued pretraining on raw `text` rows, "
                           "every token trained; dpo, orpo: prefer the chosen answer of prompt/chosen/rejected rows "
                           "(dpo against the frozen base as reference, orpo without one); kto: desirable/undesirable "
                           "answers (preference rows or prompt/completion/label rows); reward: train a reward model "
                           "(a scalar head) on preference rows.")
    block_length: int = Field(1024, ge=2, description="cpt: tokens per block a document is cut into.")
    overlap: int = Field(32, ge=0, description="cpt: tokens consecutive blocks of a document share, as context only.")
    beta: float = Field(0.1, gt=0, le=10, description="dpo, kto: strength of the pull towards the reference "
                                                       "(higher stays closer); orpo: weight of the odds-ratio term.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="dpo: assumed probability that a pair's label is "
                                                                   "flipped (conservative DPO); 0 is plain DPO.")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of the desirable answers' loss terms.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of the undesirable answers' loss terms "
                                                             "(raise it when undesirable rows are scarce).")
    margin: float = Field(0.0, ge=0, description="reward: score gap by which the chosen answer must win.")
    center_coefficient: float = Field(0.0, ge=0, description="reward: weight of the penalty on (r_chosen + "
                                                             "r_rejected)^2 that keeps scores centred near 0 "
                                                             "(0.01 is common); 0 turns it off.")

    @model_validator(mode="after")
    def _fields_fit_the_objective(self) -> "ObjectiveConfig":
        if self.overlap >= self.block_length:
            raise ValueError("overlap must be smaller than block_length")
        # a changed default, not a set key: a saved config.json spells out every field
        misplaced = [f"{key} (for {', '.join(names)})" for key, names in OBJECTIVE_FIELDS.items()
                     if self.name not in names and getattr(self, key) != type(self).model_fields[key].default]
        if misplaced:
            raise ValueError(f"not used by objective {self.name}: {'; '.join(misplaced)}")
        return self


class TaskConfig(Strict):
    path: str = Field(description="This task's data file, relative to the config file, or `bundled:tickets`.")
    weight: float | None = Field(None, ge=0, description="Relative share of training draws from this task "
                                                         "(any scale); give it for every task or for none.")


class DatasetsConfig(Strict):
    tasks: dict[str, TaskConfig] = Field(description="Task name -> data file and weight. A general-purpose replay "
                                                     "set (against forgetting) is just another task.")
    temperature: float | None = Field(None, gt=0, description="Without weights: draw task i with probability "
                                                              "proportional to size_i^(1/temperature); 1 follows "
                                                              "sizes, higher moves towards uniform.")

    @model_validator(mode="after")
    def _weights_or_temperature(self) -> "DatasetsConfig":
        if not self.tasks:
            raise ValueError("list at least one task")
        bad = [name for name in self.tasks if not name.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"task names may hold letters, digits, - and _ only: {', '.join(bad)}")
        weighted = [name for name, task in self.tasks.items() if task.weight is not None]
        if weighted and len(weighted) != len(self.tasks):
            raise ValueError("give a weight for every task or for none")
        if weighted and self.temperature is not None:
            raise ValueError("give either task weights or a temperature, not both")
        if weighted and sum(task.weight for task in self.tasks.values()) <= 0:
            raise ValueError("at least one task needs a positive weight")
        return self

    def weights(self) -> dict[str, float] | None:
        if any(task.weight is None for task in self.tasks.values()):
            return None
        return {name: task.weight for name, task in self.tasks.items()}


class EvalConfig(Strict):
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer.")
    batch_size: int = Field(16, ge=1, description="Prompts generated at once.")
    max_examples: int | None = Field(None, ge=1, description="Evaluate at most this many test rows.")
    json_mode: bool = Field(False, description="Constrain generation to a JSON object (for answers that are JSON): "
                                               "valid JSON is guaranteed, so field accuracy measures content.")


class RunConfig(Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Run name, used in the run directory.")
    model: str = Field("default", description="`default`, a local Hugging Face model directory, a GGUF file "
                                                 "(Llama architecture), or a hub id.")
    data: DataConfig = Field(default_factory=DataConfig,
                             description="The data file (or, with `datasets`, the split settings).")
    method: Method = Field(default_factory=LoraMethod, description="What is trained.")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="What is minimized.")
    datasets: DatasetsConfig | None = Field(None, description="Several data files (tasks) mixed in training by "
                                                               "weight or temperature, each split and evaluated "
                                                               "on its own; replaces data.path.")
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gate: GateConfig = Field(default_factory=GateConfig, description="When `afina run` keeps the tuned model: "
                                                                     "the metric it must beat its base on, beyond noise.")
    notify: NotifyConfig = Field(default_factory=NotifyConfig, description="Who hears of a run's decision "
                                                                           "(`afina run`).")

    @model_validator(mode="after")
    def _one_source_of_data(self) -> "RunConfig":
        if (self.data.path is None) == (self.datasets is None):
            raise ValueError("give data.path (one file) or datasets (several), not both" if self.datasets
                             else "data.path is required (or list several files under datasets)")
        if self.datasets is not None and (self.data.test_path or self.data.validation_path):
            raise ValueError("data.test_path and data.validation_path go with data.path, not with datasets")
        return self

    @model_validator(mode="before")
    @classmethod
    def _method_shorthand(cls, data: object) -> object:
        """`method: lora` is short for `method: {name: lora}` (likewise `objective: cpt`); a method
        without a name is LoRA."""
        if isinstance(data, dict) and isinstance(data.get("method"), str):
            data = {**data, "method": {"name": data["method"]}}
        if isinstance(data, dict) and isinstance(data.get("objective"), str):
            data = {**data, "objective": {"name": data["objective"]}}
        if isinstance(data, dict) and isinstance(data.get("method"), dict) and "name" not in data["method"]:
            data = {**data, "method": {"name": "lora", **data["method"]}}
        return data
