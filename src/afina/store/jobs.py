"""The jobs service's records: uploaded files, fine-tuning jobs as a queue, their events, API keys.

    job = store.claim_job("gpu-1:4711", lease_seconds=60)   # the oldest queued job, or one whose lease expired
    store.renew_lease(job.id, "gpu-1:4711", 60)             # False once the job was cancelled or taken over
    store.finish_job(job.id, "gpu-1:4711", "succeeded", fine_tuned_model="ft:...")

Claiming is one transaction that reads and updates the job: on PostgreSQL the row is locked with
`FOR UPDATE SKIP LOCKED`, so concurrent workers skip each other's rows instead of waiting; on SQLite
every write transaction holds the database's write lock (BEGIN IMMEDIATE), which serializes claims.
A worker that stops renewing its lease loses the job when the lease ends; the next claim takes it
over. `Store` inherits these methods; the transactions come from it.

Files and jobs belong to a project. The methods the API calls take `by` (the principal acting) and
`project` (the request's): they check the permission, see only that project's files and jobs (one
of another project is not found, as if it did not exist), and record what they change in the
audit trail. The workers pass neither: they act for afina on whichever job they claim.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from afina.errors import AfinaError
from afina.store.audit import append_event, audit_details
from afina.store.principals import DEFAULT_PROJECT, Principal
from afina.store.records import ApiKey, Job, JobEvent, StoredFile
from afina.store.tables import (EVENT_LEVELS, FILE_PURPOSES, ApiKeyRow, FileRow, JobEventRow, JobRow, UserRow,
                                utcnow)

FINISHED_JOB_STATUSES = ("succeeded", "failed", "cancelled")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class JobRecords:
    """Files, jobs, job events and API keys; mixed into `Store`, which provides `_read` and `_write`."""

    url: str

    # files

    def create_file(self, *, purpose: str, filename: str, bytes: int, sha256: str, path: str,
                    report: dict[str, Any] | None, project: str = DEFAULT_PROJECT,
                    by: Principal | None = None) -> StoredFile:
        """Record an uploaded file whose bytes are already in place at `path`."""
        if purpose not in FILE_PURPOSES:
            raise ValueError(f"unknown file purpose {purpose!r}")
        self.check_permission(by, "upload_data", project, filename)
        with self._write() as session:
            row = FileRow(id=new_id("file"), project=project, purpose=purpose, filename=filename, bytes=bytes,
                          sha256=sha256, path=path, report=report, created_at=utcnow(), deleted=False)
            session.add(row)
            session.flush()
            append_event(session, None, "file_uploaded", "info", f"uploaded {filename} ({bytes} bytes) as {row.id}",
                         {**audit_details("upload_data", project, row.id), "sha256": sha256}, actor=by and by.user)
            return file_record(row)

    def get_file(self, file_id: str, *, project: str | None = None, by: Principal | None = None) -> StoredFile:
        """The live file `file_id` (of `project`, when given); AfinaError `file_not_found` for an
        unknown or deleted one, or one of another project."""
        self.check_permission(by, "read_data", project or DEFAULT_PROJECT, file_id)
        with self._read() as session:
            return file_record(self._file_row(session, file_id, project))

    def list_files(self, purpose: str | None = None, *, project: str | None = None,
                   by: Principal | None = None) -> list[StoredFile]:
        """Live files (of `project`, when given), newest first."""
        self.check_permission(by, "read_data", project or DEFAULT_PROJECT)
        query = select(FileRow).where(FileRow.deleted.is_(False)).order_by(FileRow.created_at.desc(), FileRow.id)
        if purpose is not None:
            query = query.where(FileRow.purpose == purpose)
        if project is not None:
            query = query.where(FileRow.project == project)
        with self._read() as session:
            return [file_record(row) for row in session.scalars(query)]

    def delete_file(self, file_id: str, *, project: str | None = None,
                    by: Principal | None = None) -> tuple[StoredFile, bool]:
        """Mark a file deleted. Also says whether its bytes are still needed: by another live file with
        the same content, or by a job not yet finished."""
        self.check_permission(by, "upload_data", project or DEFAULT_PROJECT, file_id)
        with self._write(f"file:{file_id}") as session:
            row = self._file_row(session, file_id, project)
            row.deleted = True
            shared = session.scalar(select(func.count()).select_from(FileRow).where(
                FileRow.sha256 == row.sha256, FileRow.deleted.is_(False)))
            pending = session.scalar(select(func.count()).select_from(JobRow).where(
                or_(JobRow.training_file == file_id, JobRow.validation_file == file_id),
                JobRow.status.not_in(FINISHED_JOB_STATUSES)))
            session.flush()
            append_event(session, None, "file_deleted", "info", f"deleted {row.filename} ({row.id})",
                         audit_details("upload_data", row.project, row.id), actor=by and by.user)
            return file_record(row), bool(shared or pending)

    def _file_row(self, session: Session, file_id: str, project: str | None = None) -> FileRow:
        row = session.get(FileRow, file_id)
        if row is None or row.deleted or project not in (None, row.project):
            raise AfinaError("file_not_found", f"no file {file_id!r}", location=self.url,
                             hint="GET /v1/files lists the uploaded files")
        return row

    # jobs

    def create_job(self, *, model: str, training_file: str, validation_file: str | None,
                   hyperparameters: dict[str, Any], suffix: str | None, seed: int | None,
                   metadata: dict[str, Any] | None, afina_config: dict[str, Any], project: str = DEFAULT_PROJECT,
                   by: Principal | None = None) -> Job:
        """Queue a job on live files of its project (AfinaError `file_not_found` otherwise)."""
        self.check_permission(by, "start_job", project)
        with self._write() as session:
            for file_id in (training_file, validation_file):
                if file_id is not None:
                    self._file_row(session, file_id, project)
            row = JobRow(id=new_id("ftjob"), project=project, model=model, training_file=training_file, validation_file=validation_file,
                         hyperparameters=hyperparameters, suffix=suffix, seed=seed, job_metadata=metadata,
                         afina_config=afina_config, status="queued", attempts=0, created_at=utcnow())
            session.add(row)
            session.flush()
            add_job_event(session, row.id, "info", f"created fine-tuning job {row.id}")
            append_event(session, None, "job_created", "info", f"created fine-tuning job {row.id} on {model}",
                         {**audit_details("start_job", project, row.id), "training_file": training_file},
                         actor=by and by.user)
            return job_record(row)

    def get_job(self, job_id: str, *, project: str | None = None, by: Principal | None = None) -> Job:
        """The job `job_id` (of `project`, when given); AfinaError `job_not_found` if there is none."""
        self.check_permission(by, "read_results", project or DEFAULT_PROJECT, job_id)
        with self._read() as session:
            return job_record(self._job_row(session, job_id, project))

    def list_jobs(self, *, after: str | None = None, limit: int = 20, project: str | None = None,
                  by: Principal | None = None) -> tuple[list[Job], bool]:
        """Jobs (of `project`, when given) newest first, starting after the job `after` (cursor
        pagination); and whether more follow."""
        self.check_permission(by, "read_results", project or DEFAULT_PROJECT)
        query = select(JobRow).order_by(JobRow.created_at.desc(), JobRow.id.desc())
        if project is not None:
            query = query.where(JobRow.project == project)
        with self._read() as session:
            if after is not None:
                cursor = self._job_row(session, after, project)
                query = query.where(or_(JobRow.created_at < cursor.created_at,
                                        and_(JobRow.created_at == cursor.created_at, JobRow.id < cursor.id)))
            rows = session.scalars(query.limit(limit + 1)).all()
            return [job_record(row) for row in rows[:limit]], len(rows) > limit

    def claim_job(self, worker: str, lease_seconds: float) -> Job | None:
        """Take the oldest queued job, or a running one whose lease expired (its worker died), for
        `worker` until the lease ends. None when there is nothing to do."""
        now = utcnow()
        query = (select(JobRow)
                 .where(or_(JobRow.status == "queued", and_(JobRow.status == "running", JobRow.lease_until < now)))
                 .order_by(JobRow.created_at, JobRow.id).limit(1).with_for_update(skip_locked=True))
        with self._write() as session:
            row = session.scalars(query).first()
            if row is None:
                return None
            previous = row.worker if row.status == "running" else None
            row.status, row.worker, row.lease_until = "running", worker, now + timedelta(seconds=lease_seconds)
            row.attempts += 1
            row.started_at = row.started_at or now
            session.flush()
            taken = f" (taken over from {previous}, whose lease expired)" if previous else ""
            add_job_event(session, row.id, "info", f"claimed by worker {worker}{taken}")
            return job_record(row)

    def renew_lease(self, job_id: str, worker: str, lease_seconds: float) -> bool:
        """Extend the worker's lease; False when the job is no longer its own (cancelled, taken over)."""
        with self._write() as session:
            result = session.execute(
                update(JobRow).where(JobRow.id == job_id, JobRow.worker == worker, JobRow.status == "running")
                .values(lease_until=utcnow() + timedelta(seconds=lease_seconds)))
            return result.rowcount == 1

    def set_job_run(self, job_id: str, worker: str, run_id: str) -> None:
        """Note the afina run doing the job's work, so that a worker taking it over resumes that run."""
        with self._write() as session:
            session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.worker == worker)
                            .values(run_id=run_id))

    def finish_job(self, job_id: str, worker: str, status: str, *, error: dict[str, Any] | None = None,
                   fine_tuned_model: str | None = None, result: dict[str, Any] | None = None) -> bool:
        """End the worker's job: succeeded, failed, or back to queued (the worker stops; another one
        resumes the job). False, and nothing changed, when the job is no longer the worker's."""
        if status not in ("succeeded", "failed", "queued"):
            raise ValueError(f"a worker ends a job as succeeded, failed or queued, not {status!r}")
        with self._write(f"job:{job_id}") as session:
            row = session.get(JobRow, job_id)
            if row is None or row.status != "running" or row.worker != worker:
                return False
            row.status, row.error, row.lease_until = status, error, None
            row.fine_tuned_model, row.result = fine_tuned_model, result
            row.finished_at = None if status == "queued" else utcnow()
            if status == "queued":
                row.worker = None
            session.flush()
            message = {"succeeded": f"the job succeeded: {fine_tuned_model}",
                       "failed": f"the job failed: {(error or {}).get('message', '')}",
                       "queued": f"worker {worker} stopped; the job is queued again"}[status]
            add_job_event(session, job_id, "error" if status == "failed" else "info", message)
            return True

    def cancel_job(self, job_id: str, *, project: str | None = None, by: Principal | None = None) -> Job:
        """Cancel a job that has not finished. A running job's worker notices when it next renews its
        lease, and stops. A finished job stays as it is."""
        self.check_permission(by, "cancel_job", project or DEFAULT_PROJECT, job_id)
        with self._write(f"job:{job_id}") as session:
            row = self._job_row(session, job_id, project)
            if row.status not in FINISHED_JOB_STATUSES:
                row.status, row.finished_at, row.lease_until = "cancelled", utcnow(), None
                session.flush()
                add_job_event(session, job_id, "info", "the job was cancelled")
                append_event(session, None, "job_cancelled", "info", f"cancelled fine-tuning job {job_id}",
                             audit_details("cancel_job", row.project, job_id), actor=by and by.user)
            return job_record(row)

    def add_job_event(self, job_id: str, message: str, level: str = "info") -> JobEvent:
        """Report a job's progress."""
        with self._write() as session:
            return job_event_record(add_job_event(session, job_id, level, message))

    def job_events(self, job_id: str, *, after: int | None = None, limit: int | None = None,
                   newest_first: bool = False, project: str | None = None,
                   by: Principal | None = None) -> list[JobEvent]:
        """A job's events (AfinaError `job_not_found` for an unknown job); `after` an event id, in the
        order asked for."""
        self.check_permission(by, "read_results", project or DEFAULT_PROJECT, job_id)
        order = JobEventRow.id.desc() if newest_first else JobEventRow.id
        query = select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(order).limit(limit)
        if after is not None:
            query = query.where(JobEventRow.id < after if newest_first else JobEventRow.id > after)
        with self._read() as session:
            self._job_row(session, job_id, project)
            return [job_event_record(row) for row in session.scalars(query)]

    def _job_row(self, session: Session, job_id: str, project: str | None = None) -> JobRow:
        row = session.get(JobRow, job_id)
        if row is None or project not in (None, row.project):
            raise AfinaError("job_not_found", f"no fine-tuning job {job_id!r}", location=self.url,
                             hint="GET /v1/fine_tuning/jobs lists the jobs")
        return row

    # API keys

    def create_api_key(self, name: str, sha256: str, expires_at: datetime | None = None, *, user: str | None = None,
                       by: Principal | None = None) -> ApiKey:
        """Record a key of `user` by its SHA-256 (the caller shows the key once and forgets it). A key
        without a user acts as an admin of the default project: only a store without users makes one."""
        self.check_permission(by, "manage_users", DEFAULT_PROJECT, user or name)
        with self._write("users") as session:
            owner = self._key_owner(session, user)
            row = ApiKeyRow(name=name, sha256=sha256, user_id=owner and owner.id, created_at=utcnow(),
                            expires_at=expires_at)
            session.add(row)
            session.flush()
            until = f", expiring {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else ""
            append_event(session, None, "api_key_created", "info", f"created key {row.id} ({name}) for {user or name}"
                         f"{until}", audit_details("manage_users", DEFAULT_PROJECT, f"key:{row.id}"),
                         actor=by and by.user)
            return api_key_record(row, user)

    def list_api_keys(self, *, by: Principal | None = None) -> list[ApiKey]:
        self.check_permission(by, "manage_users", DEFAULT_PROJECT)
        query = select(ApiKeyRow, UserRow.name).outerjoin(UserRow, UserRow.id == ApiKeyRow.user_id).order_by(ApiKeyRow.id)
        with self._read() as session:
            return [api_key_record(row, user) for row, user in session.execute(query)]

    def revoke_api_keys(self, name: str, *, user: str | None = None, by: Principal | None = None) -> list[ApiKey]:
        """Revoke every live key named `name` (only `user`'s, when given); AfinaError
        `api_key_not_found` when there is none. Requests with them get 401 from then on."""
        self.check_permission(by, "manage_users", DEFAULT_PROJECT, name)
        with self._write("users") as session:
            query = select(ApiKeyRow).where(ApiKeyRow.name == name, ApiKeyRow.revoked_at.is_(None))
            if user is not None:
                query = query.where(ApiKeyRow.user_id == self._key_owner(session, user).id)
            rows = session.scalars(query).all()
            if not rows:
                raise AfinaError("api_key_not_found", f"no live API key named {name!r}", location=self.url,
                                 hint="`afina keys list` shows the keys")
            now = utcnow()
            for row in rows:
                row.revoked_at = now
            session.flush()
            append_event(session, None, "api_key_revoked", "info",
                         f"revoked key(s) {', '.join(str(row.id) for row in rows)} ({name})",
                         {**audit_details("manage_users", DEFAULT_PROJECT, ",".join(f"key:{r.id}" for r in rows)),
                          "keys": [row.id for row in rows]}, actor=by and by.user)
            return [api_key_record(row, None) for row in rows]

    def find_api_key(self, sha256: str) -> ApiKey | None:
        """The live key with this hash: not revoked, not expired."""
        with self._read() as session:
            row = session.scalars(live_key_query(sha256)).one_or_none()
            return None if row is None else api_key_record(row, None)

    def _key_owner(self, session: Session, user: str | None) -> UserRow | None:
        if user is None:
            return None
        row = session.scalars(select(UserRow).where(UserRow.name == user, UserRow.removed_at.is_(None))).one_or_none()
        if row is None:
            raise AfinaError("user_not_found", f"no user {user!r}", location=self.url,
                             hint="`afina users list` shows the users")
        return row


def live_key_query(sha256: str) -> Select:
    """The key with this hash, if it is neither revoked nor expired."""
    return select(ApiKeyRow).where(ApiKeyRow.sha256 == sha256, ApiKeyRow.revoked_at.is_(None),
                                   or_(ApiKeyRow.expires_at.is_(None), ApiKeyRow.expires_at > utcnow()))


def add_job_event(session: Session, job_id: str, level: str, message: str) -> JobEventRow:
    if level not in EVENT_LEVELS:
        raise ValueError(f"unknown event level {level!r}")
    row = JobEventRow(job_id=job_id, level=level, message=message, created_at=utcnow())
    session.add(row)
    session.flush()
    return row


def file_record(row: FileRow) -> StoredFile:
    return StoredFile(id=row.id, purpose=row.purpose, filename=row.filename, bytes=row.bytes, sha256=row.sha256,
                      path=row.path, report=row.report, created_at=row.created_at, deleted=row.deleted,
                      project=row.project)


def job_record(row: JobRow) -> Job:
    return Job(id=row.id, model=row.model, training_file=row.training_file, validation_file=row.validation_file,
               hyperparameters=row.hyperparameters, suffix=row.suffix, seed=row.seed, metadata=row.job_metadata,
               afina_config=row.afina_config, status=row.status, error=row.error,
               fine_tuned_model=row.fine_tuned_model, result=row.result, run_id=row.run_id, worker=row.worker,
               lease_until=row.lease_until, attempts=row.attempts, created_at=row.created_at,
               started_at=row.started_at, finished_at=row.finished_at, project=row.project)


def job_event_record(row: JobEventRow) -> JobEvent:
    return JobEvent(id=row.id, job_id=row.job_id, level=row.level, message=row.message, created_at=row.created_at)


def api_key_record(row: ApiKeyRow, user: str | None) -> ApiKey:
    return ApiKey(id=row.id, name=row.name, created_at=row.created_at, revoked_at=row.revoked_at,
                  expires_at=row.expires_at, user=user)
