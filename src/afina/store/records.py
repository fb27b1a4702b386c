"""What the store hands back: frozen snapshots of rows, detached from any database session.

Reading a record never touches the database again, so a record can be kept, passed to another
thread or printed after the store is closed. To change one, call the `Store` method that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class DataFile:
    """A data file, once per content."""

    id: int
    sha256: str
    path: str  # where it was first read from
    format: str  # jsonl, json, csv, parquet
    rows: int
    report: dict[str, Any] | None  # the validation report
    created_at: datetime


@dataclass(frozen=True)
class RunData:
    """One data file a run read, and its role in the run."""

    role: str  # train, validation, test or general
    data_file: DataFile


@dataclass(frozen=True)
class Run:
    """One attempt of the workflow."""

    id: str  # also the name of the run directory
    name: str
    status: str  # pending, running, succeeded, failed, discarded or interrupted
    config: dict[str, Any]  # the full run config, as validated
    run_dir: str
    base_model: str
    decision: str | None  # the gate's decision, once made
    metric_name: str | None  # the headline metric and its value for the tuned model
    metric_value: float | None
    error_code: str | None  # why the run failed, as an AfinaError code and message
    error_message: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None  # set when the run leaves pending/running


@dataclass(frozen=True)
class Stage:
    """One stage of a run, as last recorded."""

    run_id: str
    name: str  # validate, split, train, evaluate, gate, register or notify
    status: str  # running, succeeded, failed or skipped
    started_at: datetime
    finished_at: datetime | None
    figures: dict[str, Any] | None  # what the stage measured (rows, losses, metrics, interval)
    message: str | None  # one line for the user: why it failed or was skipped, what it decided

    @property
    def done(self) -> bool:
        """A resumed run does not repeat this stage."""
        return self.status in ("succeeded", "skipped")


@dataclass(frozen=True)
class Event:
    """Something worth keeping that is not a state change."""

    id: int  # increases with time: events sort by it
    run_id: str | None
    kind: str  # e.g. notify_failed, test_overlap
    level: str  # debug, info, warning or error
    message: str
    details: dict[str, Any] | None
    created_at: datetime
    actor: str | None = None  # who acted: the user running afina, or an API key's owner
    hash: str | None = None  # this event's link in the audit chain


@dataclass(frozen=True)
class ChainCheck:
    """The result of verifying the events' audit chain."""

    ok: bool
    checked: int  # events verified
    last_hash: str | None  # keep it elsewhere: removing the newest events is only visible against it
    broken_at: int | None = None  # id of the first event that does not fit the chain
    reason: str | None = None


@dataclass(frozen=True)
class Model:
    """A registered model version and its lineage."""

    id: int
    name: str
    version: int  # 1, 2, ... per name, never reused
    run_id: str | None
    base_model: str
    base_sha256: str | None  # of the base model's weights
    data_hashes: dict[str, Any]  # role -> the sha256 of each of its data files
    config: dict[str, Any]
    afina_version: str
    metrics: dict[str, Any]  # base vs tuned
    gate: dict[str, Any]  # decision, improvement and its interval
    artifacts: dict[str, Any]  # kind -> path (adapter, merged, gguf, ...)
    status: str  # registered or deleted
    created_at: datetime
    aliases: tuple[str, ...]  # aliases pointing at this version, e.g. ("production",)

    @property
    def ref(self) -> str:
        """`name:version`, the reference `Store.get_model` reads back."""
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class StoredFile:
    """A file uploaded to the jobs service."""

    id: str  # file-...
    purpose: str  # fine-tune
    filename: str  # as uploaded
    bytes: int
    sha256: str
    path: str  # where its bytes live (content-addressed in the afina home)
    report: dict[str, Any] | None  # the validation report made at upload
    created_at: datetime
    deleted: bool
    project: str = "default"  # whose members may read it


@dataclass(frozen=True)
class Job:
    """A fine-tuning job of the jobs service."""

    id: str  # ftjob-...
    model: str  # the base model, as the client named it
    training_file: str
    validation_file: str | None
    hyperparameters: dict[str, Any]  # n_epochs, learning_rate_multiplier, batch_size: numbers or "auto"
    suffix: str | None
    seed: int | None
    metadata: dict[str, Any] | None
    afina_config: dict[str, Any]  # the run config the client sent (the `afina` extension field), else {}
    status: str  # validating_files, queued, running, succeeded, failed or cancelled
    error: dict[str, Any] | None  # {code, message, param} of a failed job
    fine_tuned_model: str | None  # ft:BASE:SUFFIX:ID once succeeded
    result: dict[str, Any] | None  # the run's outcome: gate decision, registered model
    run_id: str | None  # the afina run doing the work, once it exists
    worker: str | None  # who holds (or last held) the job
    lease_until: datetime | None
    attempts: int  # how many times a worker claimed it
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    project: str = "default"  # whose members may read and cancel it

    @property
    def finished(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")


@dataclass(frozen=True)
class JobEvent:
    """One line of a job's progress."""

    id: int  # increases with time
    job_id: str
    level: str  # debug, info, warning or error
    message: str
    created_at: datetime


@dataclass(frozen=True)
class ApiKey:
    """An API key's record; the key itself is shown once at creation and never kept."""

    id: int
    name: str
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None
    user: str | None = None  # whose key it is; None: made before users existed (admin of the default project)

    def state(self, now: datetime) -> str:
        """live, expired or revoked."""
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if self.expires_at is not None and self.expires_at <= now else "live"


@dataclass(frozen=True)
class User:
    """Someone who acts on the store, and their role in each project."""

    id: int
    name: str
    created_at: datetime
    removed_at: datetime | None  # removed users keep their record: the audit trail names them
    roles: dict[str, str]  # project -> admin, engineer or viewer
