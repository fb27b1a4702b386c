"""Workers: claim a queued job, run it as `afina run` would, report each stage, hold the lease.

    worker = Worker(store, name="gpu-1")
    worker.run_forever(stop)             # `afina worker`; `afina server --workers N` runs N in threads

While a job runs, a heartbeat looks every `check_seconds` whether the job is still this worker's
(a read) and renews its lease every third of `lease_seconds` (a write). Once it is not (the job was
cancelled, or this worker was presumed dead and another took the job over) the heartbeat sets the
job's cancel flag: training, run inside `stop_when(flag)`, stops after the optimizer step in
progress with a checkpoint, and any other stage stops at the next stage boundary. A worker that
dies stops renewing; once its lease ends, the next claim takes the job over and resumes its run
from the last checkpoint (`resume_workflow`), taking the steps an uninterrupted run would have.

`run_job` is what a job's work is: by default afina's workflow (`run_workflow_job`); a test or a
benchmark passes a function of its own, e.g. one that does nothing.
"""

from __future__ import annotations

import io
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from afina.errors import AfinaError
from afina.security.encryption import use_encryption
from afina.store import Job, Store


class JobCancelled(BaseException):
    """Raised at a stage boundary once the job is no longer this worker's to run. A BaseException,
    like KeyboardInterrupt, so that nothing on the way mistakes it for the work's own failure."""


@dataclass
class JobOutcome:
    """How a job's work ended."""

    status: str  # succeeded or failed
    fine_tuned_model: str | None = None
    error: dict[str, Any] | None = None  # {code, message, param}
    result: dict[str, Any] = field(default_factory=dict)  # afina's extension: run, gate decision, model


@dataclass
class JobContext:
    """What the work of a job may use: the store, a way to report, and the cancel flag."""

    job: Job
    store: Store
    worker: str
    cancelled: threading.Event
    console: Console

    def report(self, message: str, level: str = "info") -> None:
        self.store.add_job_event(self.job.id, message, level)

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled


RunJob = Callable[[JobContext], JobOutcome]


def fine_tuned_name(job: Job) -> str:
    """OpenAI's `ft:BASE:SUFFIX:ID`; a local base model is named by its folder."""
    base = Path(job.model).name if "/" in job.model and Path(job.model).expanduser().exists() else job.model
    return f"ft:{base}:{job.suffix or ''}:{job.id}"


class ReportingStore:
    """The store as the workflow sees it inside a job: every stage started or finished is also a job
    event, the run's id is noted on the job, and a cancelled job stops before its next stage."""

    def __init__(self, context: JobContext):
        self._context = context
        self._store = context.store

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def create_run(self, run_id: str, **fields):
        run = self._store.create_run(run_id, **fields)
        self._store.set_job_run(self._context.job.id, self._context.worker, run_id)
        self._context.report(f"run {run_id} started")
        return run

    def start_stage(self, run_id: str, name: str):
        if self._context.cancelled.is_set():
            self._store.set_run_status(run_id, "interrupted", error_code="cancelled",
                                       error_message="the fine-tuning job was cancelled")
            raise JobCancelled
        self._context.report(f"stage {name} started")
        return self._store.start_stage(run_id, name)

    def finish_stage(self, run_id: str, name: str, status: str, figures=None, message=None):
        stage = self._store.finish_stage(run_id, name, status, figures, message)
        self._context.report(f"stage {name} {status}" + (f": {message}" if message else ""),
                             "error" if status == "failed" else "info")
        return stage


def run_workflow_job(context: JobContext) -> JobOutcome:
    """A job's work: afina's workflow on the job's run config; a run this job started before (its
    worker died) is resumed from its last checkpoint instead of started again."""
    from afina.jobs.run_config import run_config_of
    from afina.pipeline.workflow import resume_workflow, start_workflow
    from afina.training.loop import stop_when

    store, job = ReportingStore(context), context.job
    with stop_when(context.cancelled):  # a cancel stops training after the step in progress
        if job.run_id is not None:
            run = context.store.get_run(job.run_id)
            context.report(f"resuming run {run.id} from its last checkpoint")
            result = resume_workflow(Path(run.run_dir), store, context.console)
        else:
            result = start_workflow(run_config_of(job, context.store), store, context.console)
    gate = asdict(result.decision) if result.decision is not None else None
    extension = {"run_id": result.run_id, "run_dir": str(result.run_dir), "gate": gate, "model": result.model}
    if result.status == "succeeded":
        return JobOutcome("succeeded", fine_tuned_name(job), result=extension)
    if result.status == "discarded":
        reasons = "; ".join(gate["reasons"]) if gate else "the gate discarded it"
        return JobOutcome("failed", error={"code": "gate_discarded", "param": None,
                                           "message": f"the tuned model did not beat its base: {reasons}"},
                          result=extension)
    if context.cancelled.is_set():  # training stopped for the cancel, its checkpoint written
        context.store.set_run_status(result.run_id, "interrupted", error_code="cancelled",
                                     error_message="the fine-tuning job was cancelled; its last checkpoint is kept")
    raise JobCancelled  # interrupted: cancelled, or stopped by a signal to this worker, with a checkpoint written


class Worker:
    """Claims jobs from the store one at a time and runs them."""

    def __init__(self, store: Store, *, name: str | None = None, run_job: RunJob = run_workflow_job,
                 lease_seconds: float = 60.0, poll_seconds: float = 2.0, check_seconds: float = 1.0,
                 console: Console | None = None):
        use_encryption()  # a job's run is kept encrypted at rest when a master key is set
        self.store, self.run_job = store, run_job
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
        self.lease_seconds, self.poll_seconds = lease_seconds, poll_seconds
        self.check_seconds = min(check_seconds, lease_seconds / 3)  # how soon a cancel is noticed
        self.console = console or Console(file=io.StringIO())  # threads of a server print nothing
        self.jobs_run = 0

    def run_forever(self, stop: threading.Event, max_jobs: int | None = None) -> None:
        """Claim and run jobs until `stop` is set (checked between jobs) or `max_jobs` have run."""
        while not stop.is_set() and (max_jobs is None or self.jobs_run < max_jobs):
            if not self.run_next():
                stop.wait(self.poll_seconds)

    def run_next(self) -> bool:
        """Claim one job and run it to its end; False when none was waiting."""
        job = self.store.claim_job(self.name, self.lease_seconds)
        if job is None:
            return False
        self.jobs_run += 1
        cancelled = threading.Event()
        done = threading.Event()
        heartbeat = threading.Thread(target=self._heartbeat, args=(job, cancelled, done), daemon=True,
                                     name=f"lease-{job.id}")
        heartbeat.start()
        try:
            self._run(JobContext(job, self.store, self.name, cancelled, self.console))
        finally:
            done.set()
            heartbeat.join()
        return True

    def _run(self, context: JobContext) -> None:
        job = context.job
        try:
            outcome = self.run_job(context)
        except JobCancelled:
            if context.cancelled.is_set() or self.store.get_job(job.id).finished:
                context.report("stopped: the job is no longer this worker's")
                return
            self.store.finish_job(job.id, self.name, "queued")  # a signal stopped this worker: another resumes
            raise KeyboardInterrupt from None
        except KeyboardInterrupt:
            self.store.finish_job(job.id, self.name, "queued")
            raise
        except AfinaError as error:
            outcome = JobOutcome("failed", error={"code": error.code, "message": error.message,
                                                  "param": error.location})
        except Exception as error:  # noqa: BLE001 - a bug in one job fails that job; the worker goes on
            outcome = JobOutcome("failed", error={"code": "internal_error", "param": None,
                                                  "message": f"{type(error).__name__}: {error}"})
        self.store.finish_job(job.id, self.name, outcome.status, error=outcome.error,
                              fine_tuned_model=outcome.fine_tuned_model, result=outcome.result)

    def _heartbeat(self, job: Job, cancelled: threading.Event, done: threading.Event) -> None:
        """Until the job's work is done: renew the lease every third of it, look in between whether
        the job is still this worker's; set `cancelled` as soon as it is not."""
        renewed = time.monotonic()
        while not done.wait(self.check_seconds):
            due = time.monotonic() - renewed >= self.lease_seconds / 3
            try:
                still_mine = (self.store.renew_lease(job.id, self.name, self.lease_seconds) if due
                              else holds_job(self.store, job.id, self.name))
            except Exception:  # noqa: BLE001 - the database out of reach a moment: try again, within the lease
                still_mine = time.monotonic() - renewed < self.lease_seconds * 2 / 3
            else:
                renewed = time.monotonic() if due else renewed
            if not still_mine:  # stop before another worker may take the job over
                cancelled.set()
                return


def holds_job(store: Store, job_id: str, worker: str) -> bool:
    """Whether `worker` still runs `job_id`: not cancelled, not taken over by another worker."""
    job = store.get_job(job_id)
    return job.status == "running" and job.worker == worker


def start_worker_threads(store: Store, count: int, stop: threading.Event, **options) -> list[threading.Thread]:
    """`count` workers in threads of this process (`afina server --workers N`), until `stop` is set."""
    threads = []
    for index in range(count):
        worker = Worker(store, name=f"{socket.gethostname()}:{os.getpid()}:{index}", **options)
        thread = threading.Thread(target=worker.run_forever, args=(stop,), daemon=True, name=f"afina-worker-{index}")
        thread.start()
        threads.append(thread)
    return threads

