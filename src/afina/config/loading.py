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
    """Read and validate a run config; relative data paths are resolved against the config's folder."""
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
    config = validate_config(merge(raw, parse_overrides(overrides or [])), source=str(path))
    config.data.path = resolve_relative(config.data.path, path.parent)
    for task in (config.datasets.tasks.values() if config.datasets else ()):
        task.path = resolve_relative(task.path, path.parent)
    return config


def resolve_relative(data_path: str | None, folder: Path) -> str | None:
    """A data path relative to the config's folder made absolute; bundled and absolute paths as they are."""
    if data_path is None or data_path.startswith("bundled:") or Path(data_path).expanduser().is_absolute():
        return data_path
    return str((folder / data_path).resolve())


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
