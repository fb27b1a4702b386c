"""The store's API: every record afina keeps goes in and comes out through `Store`.

    store = open_store()                      # AFINA_DATABASE_URL, else SQLite in the afina home
    store.create_run("tickets-20261123-101500", name="tickets", config=..., run_dir=..., base_model=...)
    store.start_stage(run_id, "train")
    store.finish_stage(run_id, "train", "succeeded", figures={"loss": 0.41})

Each method that changes something is one transaction: after a crash the store holds the state
before the call or after it, never half of it. Methods return frozen records (`afina.store.records`),
not database rows.

A store that acts for users is opened with the permission check it applies to them:

    store = open_store(authorize=authorize)   # afina.security.permissions.authorize
    store.promote("tickets", "production", by=store.principal("alice"))
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic.util.exc import CommandError
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

import afina
from afina.errors import AfinaError
from afina.store.audit import GENESIS, append_event, audit_details, event_hash, event_record, event_resources
from afina.store.database import (WRITE, create_store_engine, database_url, lock, mask_url, migrate_store, parse_url,
                                  unavailable)
from afina.store.jobs import JobRecords
from afina.store.principals import DEFAULT_PROJECT, Authorize, Principal
from afina.store.records import ChainCheck, DataFile, Event, Model, Run, RunData, Stage
from afina.store.tables import (DATA_ROLES, EVENT_LEVELS, RUN_STATUSES, STAGE_NAMES, AliasRow, DataFileRow,
                                EventRow, ModelRow, RunDataRow, RunRow, StageRow, utcnow)
from afina.store.users import UserRecords

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
ALIAS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")  # starts with a letter: never mistaken for a version
ACTIVE_RUN_STATUSES = ("pending", "running")
FINISHED_STAGE_STATUSES = ("succeeded", "failed", "skipped")


def open_store(url: str | None = None, *, authorize: Authorize | None = None) -> Store:
    """Open the store at `url`, else at `AFINA_DATABASE_URL`, else at `AFINA_HOME/afina.db`, and bring
    its schema up to date. A store that cannot be opened is an AfinaError `store_unavailable` naming
    the database (password masked). `authorize` is the permission check for the methods called with
    `by=` (`afina.security.permissions.authorize`); without one, those calls are refused."""
    parsed = parse_url(database_url(url))
    engine = create_store_engine(parsed)
    try:
        migrate_store(engine)
    except AfinaError:
        engine.dispose()
        raise
    except (SQLAlchemyError, CommandError, OSError) as e:
        engine.dispose()
        raise unavailable(e, parsed) from None
    return Store(engine, authorize)


class Store(JobRecords, UserRecords):
    """afina's records: data files, runs and their stages, events, model versions and aliases; the
    jobs service's files, jobs, job events and API keys (`afina.store.jobs`); users and their roles
    (`afina.store.users`).

    The methods that users reach through the API and the CLI take `by`, the `Principal` acting: they
    check its permission with the store's `authorize` (handed in by whoever opened the store for
    users, `afina.security.permissions.authorize`) before anything changes, record a refusal in the
    audit trail, and name it in the audit event of what they change. A store given no check refuses
    every `by` (fail closed). afina's own steps (a run's stages, a worker's bookkeeping) pass no `by`
    and act as the process's user.

    Safe to share between threads; several processes may open the same store at once. Open it with
    `open_store`; close it (or use it as a context manager) to release its connections.
    """

    def __init__(self, engine: Engine, authorize: Authorize | None = None):
        self._engine = engine
        self._authorize = authorize
        self._reads = sessionmaker(engine)
        self._writes = sessionmaker(engine.execution_options(**{WRITE: True}))
        self.url = mask_url(engine.url)  # for messages: the password masked
        self.dialect = engine.dialect.name  # sqlite or postgresql

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self._translated(), self._reads() as session:
            yield session

    @contextmanager
    def _write(self, *keys: str) -> Iterator[Session]:
        """One transaction, committed when the block ends; `keys` serialize it with others taking them."""
        with self._translated(), self._writes.begin() as session:
            for key in keys:
                lock(session.connection(), key)
            yield session

    def check_permissions_with(self, authorize: Authorize) -> Store:
        """Give a store that was opened without one the permission check for `by` (a service handed
        an open store does this); returns the store."""
        self._authorize = authorize
        return self

    def check_permission(self, by: Principal | None, action: str, project: str, resource: str | None = None) -> None:
        """Check `by`'s permission (none to check for afina's own steps); a refusal is kept in the
        audit trail, in a transaction of its own, before the AfinaError `permission_denied` is raised.
        A store given no permission check refuses every `by` (AfinaError `permissions_not_set_up`)."""
        if by is None:
            return
        try:
            if self._authorize is None:
                raise AfinaError("permissions_not_set_up", f"{by.user} may not {action.replace('_', ' ')}: this "
                                 "store was opened without a permission check", location=self.url,
                                 hint="open it with open_store(authorize=afina.security.permissions.authorize)")
            self._authorize(by, action, project)
        except AfinaError as denied:
            with self._write() as session:
                append_event(session, None, "permission_denied", "warning", denied.message,
                             audit_details(action, project, resource, "denied"), actor=by.user)
            raise

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as e:  # gone, locked past the timeout, read-only, disk full
            raise unavailable(e, self._engine.url) from None

    # data files

    def record_data_file(self, sha256: str, path: str | Path, format: str, rows: int,
                         report: dict[str, Any] | None = None) -> DataFile:
        """Record a data file by its content hash. The same content again returns the first record."""
        with self._write(f"data_file:{sha256}") as session:
            row = session.scalars(select(DataFileRow).where(DataFileRow.sha256 == sha256)).one_or_none()
            if row is None:
                row = DataFileRow(sha256=sha256, path=str(path), format=format, rows=rows, report=report)
                session.add(row)
                session.flush()
            return data_file_record(row)

    # runs

    def create_run(self, run_id: str, *, name: str, config: dict[str, Any], run_dir: str | Path, base_model: str,
                   data: Mapping[str, Sequence[DataFile]] | None = None, status: str = "pending") -> Run:
        """Record a new run and the data files it reads, by role (train, validation, test, general)."""
        check_one_of("run status", status, RUN_STATUSES)
        for role in data or {}:
            check_one_of("data role", role, DATA_ROLES)
        with self._write(f"run:{run_id}") as session:
            if session.get(RunRow, run_id) is not None:
                raise AfinaError("run_exists", f"a run {run_id!r} is already recorded", location=str(run_id),
                                 hint="resume it, or start a new run")
            now = utcnow()
            row = RunRow(id=run_id, name=name, status=status, config=config, run_dir=str(run_dir),
                         base_model=base_model, created_at=now, updated_at=now)
            session.add(row)
            session.flush()
            for role, files in (data or {}).items():
                for file in {f.id: f for f in files}.values():
                    session.add(RunDataRow(run_id=run_id, data_file_id=file.id, role=role))
            append_event(session, run_id, "run_started", "info", f"run {run_id} started",
                         {"name": name, "base_model": base_model,
                          "data": {role: [f.sha256 for f in files] for role, files in (data or {}).items()}})
            return run_record(row)

    def set_run_status(self, run_id: str, status: str, *, decision: str | None = None, metric_name: str | None = None,
                       metric_value: float | None = None, error_code: str | None = None,
                       error_message: str | None = None) -> Run:
        """Move a run to `status` and record what is given (None leaves a field as it was). Leaving
        pending/running sets `finished_at`; going back to running (a resume) clears it and the error."""
        check_one_of("run status", status, RUN_STATUSES)
        with self._write(f"run:{run_id}") as session:
            row = self._run_row(session, run_id)
            row.status = status
            now = utcnow()
            row.updated_at = now
            row.finished_at = None if status in ACTIVE_RUN_STATUSES else now
            if status == "running":
                row.error_code = row.error_message = None
            for field, value in (("decision", decision), ("metric_name", metric_name), ("metric_value", metric_value),
                                 ("error_code", error_code), ("error_message", error_message)):
                if value is not None:
                    setattr(row, field, value)
            return run_record(row)

    def get_run(self, run_id: str, *, by: Principal | None = None) -> Run:
        """The run `run_id`; AfinaError `run_not_found` if there is none."""
        self.check_permission(by, "read_results", DEFAULT_PROJECT, run_id)
        with self._read() as session:
            return run_record(self._run_row(session, run_id))

    def list_runs(self, *, status: str | None = None, name: str | None = None, limit: int | None = None,
                  by: Principal | None = None) -> list[Run]:
        """Runs, newest first, optionally only those with this status or name."""
        self.check_permission(by, "read_results", DEFAULT_PROJECT)
        query = select(RunRow).order_by(RunRow.created_at.desc(), RunRow.id.desc()).limit(limit)
        if status is not None:
            query = query.where(RunRow.status == status)
        if name is not None:
            query = query.where(RunRow.name == name)
        with self._read() as session:
            return [run_record(row) for row in session.scalars(query)]

    def run_data(self, run_id: str) -> list[RunData]:
        """The data files a run reads, by role."""
        query = (select(RunDataRow.role, DataFileRow).join(DataFileRow, DataFileRow.id == RunDataRow.data_file_id)
                 .where(RunDataRow.run_id == run_id).order_by(RunDataRow.role, DataFileRow.id))
        with self._read() as session:
            return [RunData(role, data_file_record(file)) for role, file in session.execute(query)]

    def _run_row(self, session: Session, run_id: str) -> RunRow:
        row = session.get(RunRow, run_id)
        if row is None:
            raise AfinaError("run_not_found", f"no run {run_id!r} in the store", location=self.url,
                             hint="`afina runs list` shows the recorded runs")
        return row

    # stages

    def start_stage(self, run_id: str, name: str) -> Stage:
        """Mark a stage running. A stage that failed or was cut off starts again; one that succeeded
        or was skipped is done, and starting it again is a mistake (check `finished_stages`)."""
        check_one_of("stage", name, STAGE_NAMES)
        with self._write(f"run:{run_id}") as session:
            self._run_row(session, run_id)
            row = session.scalars(select(StageRow).filter_by(run_id=run_id, name=name)).one_or_none()
            if row is None:
                row = StageRow(run_id=run_id, name=name, status="running")
                session.add(row)
            elif row.status in ("succeeded", "skipped"):
                raise ValueError(f"stage {name} of run {run_id} already {row.status}; it is not run again")
            else:
                row.status, row.started_at, row.finished_at = "running", utcnow(), None
                row.figures = row.message = None
            session.flush()
            return stage_record(row)

    def finish_stage(self, run_id: str, name: str, status: str, figures: dict[str, Any] | None = None,
                     message: str | None = None) -> Stage:
        """Record how a stage ended: succeeded, failed or skipped (a stage never started may be
        finished directly, e.g. skipped). Finishing a finished stage again with the same status
        changes nothing and returns the first record."""
        check_one_of("stage", name, STAGE_NAMES)
        check_one_of("stage outcome", status, FINISHED_STAGE_STATUSES)
        with self._write(f"run:{run_id}") as session:
            self._run_row(session, run_id)
            row = session.scalars(select(StageRow).filter_by(run_id=run_id, name=name)).one_or_none()
            if row is not None and row.status != "running":
                if row.status != status:
                    raise ValueError(f"stage {name} of run {run_id} already {row.status}; start it again first")
                return stage_record(row)
            if row is None:
                row = StageRow(run_id=run_id, name=name, status=status)
                session.add(row)
            row.status, row.finished_at, row.figures, row.message = status, utcnow(), figures, message
            session.flush()
            return stage_record(row)

    def stages(self, run_id: str) -> list[Stage]:
        """The run's stages in pipeline order, as last recorded."""
        with self._read() as session:
            rows = session.scalars(select(StageRow).where(StageRow.run_id == run_id)).all()
            return sorted((stage_record(r) for r in rows), key=lambda s: STAGE_NAMES.index(s.name))

    def finished_stages(self, run_id: str) -> list[str]:
        """The stages a resumed run does not repeat (succeeded or skipped), in pipeline order."""
        return [stage.name for stage in self.stages(run_id) if stage.done]

    # events

    def add_event(self, kind: str, message: str, *, run_id: str | None = None, level: str = "info",
                  details: dict[str, Any] | None = None) -> Event:
        """Keep an event, e.g. a notification that could not be delivered (kind notify_failed, level warning)."""
        check_one_of("event level", level, EVENT_LEVELS)
        with self._write() as session:
            return event_record(append_event(session, run_id, kind, level, message, details))

    def verify_events(self, *, by: Principal | None = None) -> ChainCheck:
        """Walk the events' audit chain: each event's hash must cover its own content and the previous
        event's hash. An edited, deleted or reordered event is found, with its id."""
        self.check_permission(by, "read_audit", DEFAULT_PROJECT)
        previous, checked = GENESIS, 0
        with self._read() as session:
            for row in session.scalars(select(EventRow).where(EventRow.hash.is_not(None)).order_by(EventRow.id)):
                if row.previous_hash != previous:
                    return ChainCheck(False, checked, previous, row.id,
                                      "it does not follow the event before it (one was deleted or moved)")
                if event_hash(row) != row.hash:
                    return ChainCheck(False, checked, previous, row.id, "its content does not match its hash "
                                      "(it was edited)")
                previous, checked = row.hash, checked + 1
        return ChainCheck(True, checked, previous if checked else None)

    def events(self, run_id: str | None = None, *, kind: str | None = None, actor: str | None = None,
               action: str | None = None, resource: str | None = None, since: datetime | None = None,
               by: Principal | None = None) -> list[Event]:
        """Events in the order they happened: the run's, or every event when `run_id` is None; only
        those by `actor`, of `kind`, whose kind or action is `action`, about `resource` (a run, a
        model NAME or NAME:VERSION, a file, a job, a user, a key), or since a time, when given."""
        self.check_permission(by, "read_audit", DEFAULT_PROJECT)
        query = select(EventRow).order_by(EventRow.id)
        if run_id is not None:
            query = query.where(EventRow.run_id == run_id)
        if kind is not None:
            query = query.where(EventRow.kind == kind)
        if actor is not None:
            query = query.where(EventRow.actor == actor)
        if since is not None:
            query = query.where(EventRow.created_at >= since)
        with self._read() as session:
            events = [event_record(row) for row in session.scalars(query)]
        if action is not None:
            events = [e for e in events if action in (e.kind, (e.details or {}).get("action"))]
        if resource is not None:
            events = [e for e in events if resource in event_resources(e)]
        return events

    # models

    def register_model(self, name: str, *, run_id: str | None, base_model: str, base_sha256: str | None,
                       data_hashes: dict[str, Any], config: dict[str, Any], metrics: dict[str, Any],
                       gate: dict[str, Any], artifacts: dict[str, Any], afina_version: str | None = None) -> Model:
        """Register the next version of model `name` (1 for a new name). Versions are never reused,
        not even those of deleted models, and two processes registering at once get different ones."""
        if not MODEL_NAME.fullmatch(name):
            raise AfinaError("bad_model_name", f"{name!r} is not a model name", location=name,
                             hint="use letters, digits, '.', '_' and '-', starting with a letter or digit")
        with self._write(f"model:{name}") as session:
            latest = session.scalar(select(func.max(ModelRow.version)).where(ModelRow.name == name))
            row = ModelRow(name=name, version=(latest or 0) + 1, run_id=run_id, base_model=base_model,
                           base_sha256=base_sha256, data_hashes=data_hashes, config=config,
                           afina_version=afina_version or afina.__version__, metrics=metrics, gate=gate,
                           artifacts=artifacts, status="registered")
            session.add(row)
            session.flush()
            append_event(session, run_id, "model_registered", "info", f"registered {name}:{row.version}",
                         {"model": f"{name}:{row.version}"})
            return model_record(row, ())

    def promote(self, name: str, alias: str, version: int | None = None, *, by: Principal | None = None) -> Model:
        """Point `name:alias` (e.g. tickets:production) at `version`, by default the newest registered
        one. The alias moves: the version it pointed at before keeps its record, not the alias."""
        self.check_permission(by, "promote_model", DEFAULT_PROJECT, name)
        if not ALIAS_NAME.fullmatch(alias):
            raise AfinaError("bad_alias", f"{alias!r} is not an alias", location=alias,
                             hint="use letters, digits, '.', '_' and '-', starting with a letter")
        with self._write(f"model:{name}") as session:
            row = self._model_row(session, name if version is None else f"{name}:{version}")
            if row.status == "deleted":
                raise AfinaError("model_deleted", f"{name}:{row.version} is deleted", location=f"{name}:{row.version}",
                                 hint="promote a registered version (`afina models list`)")
            current = session.get(AliasRow, (name, alias))
            before = None if current is None else session.get(ModelRow, current.model_id).version
            if current is None:
                session.add(AliasRow(name=name, alias=alias, model_id=row.id))
            else:
                current.model_id, current.updated_at = row.id, utcnow()
            append_event(session, row.run_id, "model_promoted", "info", f"{name}:{alias} -> version {row.version}",
                         {"model": f"{name}:{row.version}", "alias": alias, "previous_version": before},
                         actor=by and by.user)
            session.flush()
            return self._model_record(session, row)

    def delete_model(self, ref: str, *, by: Principal | None = None) -> Model:
        """Mark a model version deleted and drop the aliases pointing at it; its record stays.
        Deleting its files is the caller's job. Deleting a deleted version changes nothing."""
        name = ref.partition(":")[0]
        self.check_permission(by, "delete_model", DEFAULT_PROJECT, ref)
        with self._write(f"model:{name}") as session:
            row = self._model_row(session, ref)
            if row.status != "deleted":
                row.status = "deleted"
                aliases = session.scalars(select(AliasRow).where(AliasRow.model_id == row.id)).all()
                for alias in aliases:
                    session.delete(alias)
                append_event(session, row.run_id, "model_deleted", "info", f"deleted {row.name}:{row.version}",
                             {"model": f"{row.name}:{row.version}", "aliases": [a.alias for a in aliases]},
                             actor=by and by.user)
                session.flush()
            return self._model_record(session, row)

    def get_model(self, ref: str, *, by: Principal | None = None) -> Model:
        """The model version `ref` names: `name` (its newest registered version), `name:3` or
        `name:production` (an alias). AfinaError `model_not_found` if there is none."""
        self.check_permission(by, "read_results", DEFAULT_PROJECT, ref)
        with self._read() as session:
            return self._model_record(session, self._model_row(session, ref))

    def list_models(self, name: str | None = None, *, include_deleted: bool = False,
                    by: Principal | None = None) -> list[Model]:
        """Model versions by name, then version; deleted ones only when asked for."""
        self.check_permission(by, "read_results", DEFAULT_PROJECT)
        query = select(ModelRow).order_by(ModelRow.name, ModelRow.version)
        if name is not None:
            query = query.where(ModelRow.name == name)
        if not include_deleted:
            query = query.where(ModelRow.status == "registered")
        with self._read() as session:
            rows = session.scalars(query).all()
            aliases: dict[int, list[str]] = {}
            for alias in session.scalars(select(AliasRow).order_by(AliasRow.alias)):
                aliases.setdefault(alias.model_id, []).append(alias.alias)
            return [model_record(row, tuple(aliases.get(row.id, ()))) for row in rows]

    def _model_row(self, session: Session, ref: str) -> ModelRow:
        name, _, which = ref.partition(":")
        query = select(ModelRow).where(ModelRow.name == name)
        if not which:
            query = query.where(ModelRow.status == "registered").order_by(ModelRow.version.desc()).limit(1)
        elif which.isdigit():
            query = query.where(ModelRow.version == int(which))
        else:
            query = query.join(AliasRow, AliasRow.model_id == ModelRow.id).where(AliasRow.alias == which)
        row = session.scalars(query).first()
        if row is None:
            raise AfinaError("model_not_found", f"no model {ref!r} in the store", location=self.url,
                             hint="`afina models list` shows the registered models; "
                                  "name one as NAME, NAME:VERSION or NAME:ALIAS")
        return row

    def _model_record(self, session: Session, row: ModelRow) -> Model:
        aliases = session.scalars(select(AliasRow.alias).where(AliasRow.model_id == row.id).order_by(AliasRow.alias))
        return model_record(row, tuple(aliases))


def check_one_of(what: str, value: str, allowed: Sequence[str]) -> None:
    """A value outside afina's own vocabulary is a bug in the caller, not bad user input."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(allowed)}")


def data_file_record(row: DataFileRow) -> DataFile:
    return DataFile(id=row.id, sha256=row.sha256, path=row.path, format=row.format, rows=row.rows, report=row.report,
                    created_at=row.created_at)


def run_record(row: RunRow) -> Run:
    return Run(id=row.id, name=row.name, status=row.status, config=row.config, run_dir=row.run_dir,
               base_model=row.base_model, decision=row.decision, metric_name=row.metric_name,
               metric_value=row.metric_value, error_code=row.error_code, error_message=row.error_message,
               created_at=row.created_at, updated_at=row.updated_at, finished_at=row.finished_at)


def stage_record(row: StageRow) -> Stage:
    return Stage(run_id=row.run_id, name=row.name, status=row.status, started_at=row.started_at,
                 finished_at=row.finished_at, figures=row.figures, message=row.message)


def model_record(row: ModelRow, aliases: tuple[str, ...]) -> Model:
    return Model(id=row.id, name=row.name, version=row.version, run_id=row.run_id, base_model=row.base_model,
                 base_sha256=row.base_sha256, data_hashes=row.data_hashes, config=row.config,
                 afina_version=row.afina_version, metrics=row.metrics, gate=row.gate, artifacts=row.artifacts,
                 status=row.status, created_at=row.created_at, aliases=aliases)
