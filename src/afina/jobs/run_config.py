"""A fine-tuning job as an afina run config.

OpenAI's fields map onto afina's config; the `afina` extension field is a whole run config the
job starts from, so anything `afina run` can do, a job can do:

    model                              -> model
    training_file, validation_file     -> data.path, data.validation_path (the stored bytes)
    hyperparameters.n_epochs           -> training.epochs
    hyperparameters.learning_rate_multiplier -> training.learning_rate (x the config's rate)
    hyperparameters.batch_size         -> training.gradient_accumulation (examples per optimizer step)
    seed                               -> training.seed
    suffix                             -> name (the registered model's name)
    method {type: dpo, dpo: {hyperparameters: {beta}}} -> objective dpo
"""

from __future__ import annotations

import re
from typing import Any

from afina.config.loading import merge, validate_config
from afina.config.schema import RunConfig
from afina.errors import AfinaError
from afina.store import Job, Store

SUFFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
HYPERPARAMETERS = {"n_epochs": int, "learning_rate_multiplier": float, "batch_size": int, "beta": float}
DEFAULT_LEARNING_RATE = 2e-4  # the rate the multiplier scales when the config says `auto`


def check_hyperparameters(raw: object, param: str = "hyperparameters") -> dict[str, Any]:
    """OpenAI's hyperparameters: each a positive number or "auto". AfinaError `invalid_hyperparameter`
    located at the field (e.g. `hyperparameters.n_epochs`) otherwise."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise AfinaError("invalid_hyperparameter", "hyperparameters must be an object", location=param)
    checked = {}
    for name, value in raw.items():
        where = f"{param}.{name}"
        kind = HYPERPARAMETERS.get(name)
        if kind is None:
            raise AfinaError("invalid_hyperparameter", f"unknown hyperparameter {name!r}; expected one of "
                             f"{', '.join(HYPERPARAMETERS)}", location=where)
        if value == "auto" or value is None:
            checked[name] = "auto"
            continue
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not whole) or value <= 0:
            noun = "a positive integer" if kind is int else "a positive number"
            raise AfinaError("invalid_hyperparameter", f"{name} must be {noun} or \"auto\", not {value!r}",
                             location=where)
        checked[name] = kind(value)
    return checked


def check_method(raw: object) -> dict[str, Any] | None:
    """OpenAI's `method`: {type: supervised|dpo, <type>: {hyperparameters: {...}}}, hyperparameters checked."""
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind not in ("supervised", "dpo"):
        raise AfinaError("invalid_method", "method.type must be supervised or dpo", location="method.type")
    inner = raw.get(kind) or {}
    hyperparameters = check_hyperparameters(inner.get("hyperparameters") if isinstance(inner, dict) else None,
                                            f"method.{kind}.hyperparameters")
    return {"type": kind, kind: {"hyperparameters": hyperparameters}}


def check_suffix(suffix: object) -> str | None:
    if suffix is None:
        return None
    if not isinstance(suffix, str) or not SUFFIX.fullmatch(suffix):
        raise AfinaError("invalid_suffix", "suffix must be 1-40 letters, digits, '.', '_' or '-'", location="suffix")
    return suffix


def job_config(*, model: str, training_path: str, validation_path: str | None, hyperparameters: dict[str, Any],
               suffix: str | None, seed: int | None, afina: dict[str, Any]) -> RunConfig:
    """The run config of a job: the `afina` config with the job's fields laid over it, validated.
    AfinaError `invalid_config` (located at `afina`) when the result is not a valid run config."""
    raw = merge(afina, {"model": model, "data": {"path": training_path}})
    if validation_path is not None:
        raw = merge(raw, {"data": {"validation_path": validation_path}})
    if suffix is not None:
        raw["name"] = suffix
    training: dict[str, Any] = {}
    if "n_epochs" in hyperparameters:
        training["epochs"] = hyperparameters["n_epochs"]
    if "batch_size" in hyperparameters:
        training["gradient_accumulation"] = hyperparameters["batch_size"]
    multiplier = hyperparameters.get("learning_rate_multiplier", "auto")
    if multiplier != "auto":
        base = (raw.get("training") or {}).get("learning_rate", DEFAULT_LEARNING_RATE)
        training["learning_rate"] = (DEFAULT_LEARNING_RATE if base == "auto" else float(base)) * multiplier
    if seed is not None:
        training["seed"] = seed
    if "beta" in hyperparameters:
        raw = merge(raw, {"objective": {"name": "dpo", "beta": hyperparameters["beta"]}})
    return validate_config(merge(raw, {"training": training}) if training else raw, source="afina")


def run_config_of(job: Job, store: Store) -> RunConfig:
    """The run config a worker runs for `job`, on the stored files' bytes."""
    validation = store.get_file(job.validation_file).path if job.validation_file else None
    return job_config(model=job.model, training_path=store.get_file(job.training_file).path,
                      validation_path=validation, hyperparameters=job.hyperparameters, suffix=job.suffix,
                      seed=job.seed, afina=job.afina_config)
