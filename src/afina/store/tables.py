"""The store's tables, as typed SQLAlchemy classes. The migrations in `migrations/versions/` create
exactly these; a test compares the two on a blank SQLite and a blank PostgreSQL database.

Only the store's own modules touch these classes: everyone else reads the plain records in
`afina.store.records` that `Store` returns.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Text,
                        UniqueConstraint)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from afina.store.principals import DEFAULT_PROJECT, ROLES

RUN_STATUSES = ("pending", "running", "succeeded", "failed", "discarded", "interrupted")
STAGE_NAMES = ("validate", "split", "train", "evaluate", "gate", "register", "notify")  # in pipeline order
STAGE_STATUSES = ("running", "succeeded", "failed", "skipped")
DATA_ROLES = ("train", "validation", "test", "general")
EVENT_LEVELS = ("debug", "info", "warning", "error")
MODEL_STATUSES = ("registered", "deleted")
FILE_PURPOSES = ("fine-tune",)
JOB_STATUSES = ("validating_files", "queued", "running", "succeeded", "failed", "cancelled")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every database. SQLite keeps no zone, so values are stored as
    UTC and read back with the UTC zone attached; PostgreSQL's timestamptz comes back in the session's
    zone and is converted to UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps timezone-aware UTC timestamps")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# JSON on SQLite, JSONB on PostgreSQL; Python None is SQL NULL, not the JSON 'null'.
JSONValue = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    # Named constraints, so that later migrations can alter them by name on both databases.
    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONValue}


class DataFileRow(Base):
    """A data file afina has read, once per content: the same bytes under another path are the same file."""

    __tablename__ = "data_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    format: Mapped[str] = mapped_column(String(32))
    rows: Mapped[int] = mapped_column(Integer)
    report: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RunRow(Base):
    """One attempt of the workflow; its id is also the name of its run directory."""

    __tablename__ = "runs"
    __table_args__ = (CheckConstraint(one_of("status", RUN_STATUSES), name="status"),
                      Index(None, "created_at"))

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any]]
    run_dir: Mapped[str] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(Text)
    decision: Mapped[str | None] = mapped_column(String(32))
    metric_name: Mapped[str | None] = mapped_column(String(200))
    metric_value: Mapped[float | None] = mapped_column(Float)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class RunDataRow(Base):
    """Which data files a run read, and as what."""

    __tablename__ = "run_data"
    __table_args__ = (CheckConstraint(one_of("role", DATA_ROLES), name="role"),)

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    data_file_id: Mapped[int] = mapped_column(ForeignKey("data_files.id"), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), primary_key=True)


class StageRow(Base):
    """One stage of a run: at most one row per (run, stage), so a resumed run updates it in place."""

    __tablename__ = "stages"
    # Stage names are checked by the store, not the database: a new stage needs no migration.
    __table_args__ = (UniqueConstraint("run_id", "name"),
                      CheckConstraint(one_of("status", STAGE_STATUSES), name="status"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    figures: Mapped[dict[str, Any] | None]
    message: Mapped[str | None] = mapped_column(Text)


class EventRow(Base):
    """Something worth keeping: a warning, an undelivered notification, a model registered, promoted or
    deleted, a run started. Events form a hash chain (`Store.verify_events`): an edited, deleted or
    reordered event breaks it."""

    __tablename__ = "events"
    __table_args__ = (CheckConstraint(one_of("level", EVENT_LEVELS), name="level"),
                      Index(None, "run_id", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(64))
    level: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    details: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the audit chain: who, and a hash over this event and the previous event's hash
    actor: Mapped[str | None] = mapped_column(String(200))
    previous_hash: Mapped[str | None] = mapped_column(String(64))
    hash: Mapped[str | None] = mapped_column(String(64))


class ModelRow(Base):
    """A registered model version and its lineage. Deleting it deletes its files, not this row."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version"),
                      CheckConstraint(one_of("status", MODEL_STATUSES), name="status"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[int] = mapped_column(Integer)
    run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"))
    base_model: Mapped[str] = mapped_column(Text)
    base_sha256: Mapped[str | None] = mapped_column(String(64))
    data_hashes: Mapped[dict[str, Any]]
    config: Mapped[dict[str, Any]]
    afina_version: Mapped[str] = mapped_column(String(32))
    metrics: Mapped[dict[str, Any]]
    gate: Mapped[dict[str, Any]]
    artifacts: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AliasRow(Base):
    """A movable name for one version of a model, such as `production`."""

    __tablename__ = "aliases"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class FileRow(Base):
    """An uploaded data file. Its bytes live content-addressed in the afina home (`files/SHA256.EXT`);
    deleting it marks this row deleted."""

    __tablename__ = "files"
    __table_args__ = (CheckConstraint(one_of("purpose", FILE_PURPOSES), name="purpose"),
                      Index(None, "created_at"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(64), default=DEFAULT_PROJECT)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    report: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted: Mapped[bool] = mapped_column(default=False)


class JobRow(Base):
    """A fine-tuning job submitted over the jobs API, and the queue's bookkeeping: which worker holds
    it and until when (`lease_until`); a lease that expires lets another worker take the job over."""

    __tablename__ = "jobs"
    __table_args__ = (CheckConstraint(one_of("status", JOB_STATUSES), name="status"),
                      Index(None, "status", "created_at"), Index(None, "created_at"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project: Mapped[str] = mapped_column(String(64), default=DEFAULT_PROJECT)
    model: Mapped[str] = mapped_column(Text)
    training_file: Mapped[str] = mapped_column(ForeignKey("files.id"))
    validation_file: Mapped[str | None] = mapped_column(ForeignKey("files.id"))
    hyperparameters: Mapped[dict[str, Any]]
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int | None] = mapped_column(Integer)
    job_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONValue)
    afina_config: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(32))
    error: Mapped[dict[str, Any] | None]
    fine_tuned_model: Mapped[str | None] = mapped_column(Text)
    result: Mapped[dict[str, Any] | None]  # the run's outcome: gate decision, registered model
    run_id: Mapped[str | None] = mapped_column(String(200))
    worker: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class JobEventRow(Base):
    """What a job's worker reported: stages started and finished, failures, cancellation."""

    __tablename__ = "job_events"
    __table_args__ = (CheckConstraint(one_of("level", EVENT_LEVELS), name="level"),
                      Index(None, "job_id", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    level: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UserRow(Base):
    """Someone who acts on the store, through the CLI or their API keys. Removing a user keeps this row
    (the audit trail names them) and ends their memberships and keys."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    removed_at: Mapped[datetime | None]


class MembershipRow(Base):
    """A user's role in a project: one per (user, project)."""

    __tablename__ = "memberships"
    __table_args__ = (CheckConstraint(one_of("role", ROLES), name="role"),)

    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    project: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKeyRow(Base):
    """An API key: only the key's SHA-256 is kept, never the key. It acts as its user; a key without
    one was made before users existed and acts as an admin of the default project."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
