"""Load a YAML config, apply `key=value` overrides, and report every error at once."""

from __future__ import annotations

import difflib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from afina.config.schema import RunConfig
from afina.errors import AfinaError


def parse_overrides(items: list[str]) -> dict:
    """`training.learning_rate=1e-4` -> {"training": {"learning_rate": 1e-4}}; values are parsed as YAML."""
    overrides: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AfinaError("invalid_override", f"{item!r} is not key=value", location="command line")
        node = overrides
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value) if value else ""
    return overrides


def merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a run config. Relative paths written in the file resolve against the
    config's folder; relative paths given as overrides on the command line against the current
    directory (where the user typed them)."""
    path = Path(path)
    if not path.is_file():
        raise AfinaError("file_not_found", "no such config file", location=str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise AfinaError("invalid_utf8", "the config is not UTF-8 text", location=str(path)) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise AfinaError("invalid_yaml", str(getattr(exc, "problem", exc)), location=where) from exc
    if not isinstance(raw, dict):
        raise AfinaError("invalid_config", "the config must be a YAML mapping", location=str(path))
    typed = resolve_paths(parse_overrides(overrides or []), Path.cwd())
    return validate_config(merge(resolve_paths(raw, path.parent.resolve()), typed), source=str(path))


DATA_PATH_KEYS = ("path", "test_path", "validation_path")


def resolve_paths(raw: dict, folder: Path) -> dict:
    """A copy of a raw config (or overrides) with its relative file paths made absolute against
    `folder`: data.path, data.test_path, data.validation_path, datasets.tasks.*.path, gate.general_data,
    and `model`
    when it names a local directory. Anything of the wrong shape is left for validation to report."""
    raw = dict(raw)
    if isinstance(raw.get("data"), dict):
        raw["data"] = {key: resolve_relative(value, folder) if key in DATA_PATH_KEYS and isinstance(value, str)
                       else value for key, value in raw["data"].items()}
    datasets = raw.get("datasets")
    if isinstance(datasets, dict) and isinstance(datasets.get("tasks"), dict):
        tasks = {name: {**task, "path": resolve_relative(task["path"], folder)}
                 if isinstance(task, dict) and isinstance(task.get("path"), str) else task
                 for name, task in datasets["tasks"].items()}
        raw["datasets"] = {**datasets, "tasks": tasks}
    gate = raw.get("gate")
    if isinstance(gate, dict) and isinstance(gate.get("general_data"), str):
        raw["gate"] = {**gate, "general_data": resolve_relative(gate["general_data"], folder)}
    if isinstance(raw.get("model"), str) and is_local_model_path(raw["model"], folder):
        raw["model"] = resolve_relative(raw["model"], folder)
    return raw


def is_local_model_path(model: str, folder: Path) -> bool:
    """`./m`, `../m`, `~/m`, `/m`, or a name that exists as a folder there; `default` and hub ids
    (`org/name`) that are not folders stay as they are."""
    if model == "default":
        return False
    return model.startswith((".", "/", "~")) or (folder / model).exists()


def resolve_relative(data_path: str | None, folder: Path) -> str | None:
    """A path relative to `folder` made absolute (`~` expanded); bundled paths as they are."""
    if data_path is None or data_path.startswith("bundled:"):
        return data_path
    expanded = Path(data_path).expanduser()
    return str(expanded if expanded.is_absolute() else (folder / expanded).resolve())


RESUMABLE_KEYS = ("training.max_steps", "training.epochs", "training.max_time_minutes", "training.max_cost")


def apply_resume_overrides(config: RunConfig, overrides: list[str], source: str = "command line") -> RunConfig:
    """The saved config of a run being resumed, with the overrides a resume may change: more steps or
    epochs, other time and cost budgets. Anything else would make the checkpoints describe another
    run, so it is refused with the key named; so is fewer steps or epochs than the run was given."""
    flat = flatten(parse_overrides(overrides))
    refused = [key for key in flat if key not in RESUMABLE_KEYS]
    if refused:
        raise AfinaError("resume_override_refused", f"a resumed run cannot change {', '.join(refused)}",
                         location=refused[0], hint="a resume may change only " + ", ".join(RESUMABLE_KEYS)
                         + "; start a new run to change anything else")
    for key in ("training.max_steps", "training.epochs"):
        before = getattr(config.training, key.split(".")[1])
        after = flat.get(key)
        if isinstance(after, (int, float)) and before is not None and after < before:
            raise AfinaError("resume_override_refused", f"a resume may extend {key}, not lower it ({before} -> {after})",
                             location=key, hint="start a new run for a shorter one")
    return validate_config(merge(config.model_dump(mode="json"), parse_overrides(overrides)), source=source)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"training": {"max_steps": 5}} -> {"training.max_steps": 5}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        problems = [describe_error(error) for error in exc.errors()]
        raise AfinaError("invalid_config", f"{len(problems)} problem(s): " + "; ".join(problems),
                         location=source) from None


def describe_error(error: dict) -> str:
    """One readable line per pydantic error; unknown keys get the nearest valid key suggested."""
    parts, model = walk_location([str(part) for part in error["loc"] if not str(part).startswith("function-")])
    dotted = ".".join(parts) or "(top level)"
    if error["type"] == "extra_forbidden":
        valid = list(model.model_fields) if model else []
        guess = difflib.get_close_matches(parts[-1], valid, n=1, cutoff=0.5)
        suggestion = f", did you mean {guess[0]!r}?" if guess else f" (valid: {', '.join(sorted(valid))})"
        return f"{dotted}: unknown key{suggestion}"
    return f"{dotted}: {error['msg']}"


def walk_location(loc: list[str]) -> tuple[list[str], type[BaseModel] | None]:
    """Follow a pydantic error location through RunConfig: the path as the user wrote it (without
    union tags such as `lora`) and the model that holds its last key."""
    model: type[BaseModel] | None = RunConfig
    parts: list[str] = []
    index = 0
    while index < len(loc):
        part = loc[index]
        parts.append(part)
        index += 1
        if index == len(loc):
            break
        field = model.model_fields.get(part) if model else None
        annotation = getattr(field, "annotation", None)
        members = [a for a in (getattr(annotation, "__args__", None) or (annotation,))
                   if isinstance(a, type) and issubclass(a, BaseModel)]
        tagged = {m.model_fields["name"].default: m for m in members if "name" in m.model_fields}
        if loc[index] in tagged:  # a tagged union: pydantic puts the tag in the path
            model = tagged[loc[index]]
            index += 1
        else:
            model = members[0] if members else None
    return parts, model
