"""What an export starts from: a run directory, or a registered model version that names one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from afina.config.schema import RunConfig
from afina.errors import AfinaError
from afina.pipeline.run_dir import check_run_dir
from afina.store.records import Model


@dataclass(frozen=True)
class ExportSource:
    """The run an export reads, and its registry record when the store has one (for the model card)."""

    run_dir: Path
    config: RunConfig
    record: Model | None


def resolve_source(target: str) -> ExportSource:
    """`target` is a run directory, or NAME, NAME:VERSION or NAME:ALIAS in the registry. The run is
    checked (config, test split, trained weights) before any model loads."""
    path = Path(target).expanduser()
    if path.is_dir():
        config = check_run_dir(path, ("test",), trained=True)
        return ExportSource(path, config, find_record(path.name))
    if path.exists() or "/" in target:
        raise AfinaError("run_not_found", "not a run directory", location=target,
                         hint="give a run directory from afina train / afina run, or a model as NAME:VERSION")
    from afina.store import open_store

    with open_store() as store:
        record = store.get_model(target)
    if record.status != "registered":
        raise AfinaError("model_deleted", f"{record.ref} was deleted: its trained weights are gone", location=target,
                         hint="`afina models list` shows the registered versions")
    run_dir = Path(record.artifacts.get("run_dir", ""))
    config = check_run_dir(run_dir, ("test",), trained=True)
    return ExportSource(run_dir, config, record)


def find_record(run_id: str) -> Model | None:
    """The registered model a run produced, if the store knows one; an export works without a store."""
    import os

    from afina.paths import afina_home
    from afina.store import open_store

    if not os.environ.get("AFINA_DATABASE_URL") and not (afina_home() / "afina.db").is_file():
        return None  # no store yet: do not create one just to look
    try:
        with open_store() as store:
            found = [m for m in store.list_models() if m.run_id == run_id]
    except AfinaError:
        return None
    return found[-1] if found else None
