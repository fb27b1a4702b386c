"""Job throughput of afina's queue: no-op jobs claimed and finished per second, by 1 and by N workers
at once, on the store named by AFINA_DATABASE_URL (PostgreSQL for the figure the README quotes).

    AFINA_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1/test python benchmarks/job_queue.py --workers 8

Each run queues its jobs in a schema of its own (PostgreSQL) and drops it afterwards. Reports jobs
per second for each worker count and the ratio of N workers to one; every job must run exactly once.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

from sqlalchemy import create_engine, text

from afina.jobs.worker import JobContext, JobOutcome, Worker
from afina.store import open_store
from afina.store.database import parse_url


def throughput(url: str, workers: int, jobs: int) -> float:
    """Jobs per second for `workers` threads draining `jobs` queued no-op jobs."""
    with open_store(url) as store:
        file = store.create_file(purpose="fine-tune", filename="d.jsonl", bytes=1, sha256="0" * 64, path="/none",
                                 report=None)
        for _ in range(jobs):
            store.create_job(model="default", training_file=file.id, validation_file=None, hyperparameters={},
                             suffix=None, seed=None, metadata=None, afina_config={})
        ran: Counter = Counter()
        lock = threading.Lock()

        def no_op(context: JobContext) -> JobOutcome:
            with lock:
                ran[context.job.id] += 1
            return JobOutcome("succeeded")

        stop = threading.Event()
        pool = [Worker(store, name=f"bench-{i}", run_job=no_op, poll_seconds=0.01) for i in range(workers)]
        threads = [threading.Thread(target=w.run_forever, args=(stop,)) for w in pool]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        while sum(ran.values()) < jobs:
            time.sleep(0.005)
        seconds = time.perf_counter() - started
        stop.set()
        for thread in threads:
            thread.join()
        assert len(ran) == jobs and set(ran.values()) == {1}, "a job ran twice or not at all"
        return jobs / seconds


def fresh_database(base: str) -> tuple[str, Callable[[], None]]:
    """A blank database for one measurement, and how to remove it."""
    parsed = parse_url(base)
    if parsed.get_backend_name() == "sqlite":
        path = f"/tmp/afina-queue-{uuid.uuid4().hex[:8]}.db"
        return f"sqlite:///{path}", lambda: [os.remove(p) for p in (path, path + "-wal", path + "-shm")
                                            if os.path.exists(p)]
    schema = f"afina_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(parsed)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))

    def drop() -> None:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()

    return parsed.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False), drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=400)
    args = parser.parse_args()
    base = os.environ.get("AFINA_DATABASE_URL", "sqlite:///afina-queue.db")
    rates = {}
    for workers in (1, args.workers):
        url, drop = fresh_database(base)
        try:
            rates[workers] = throughput(url, workers, args.jobs)
        finally:
            drop()
    backend = parse_url(base).get_backend_name()
    for workers, rate in rates.items():
        print(f"{backend}, {workers} workers: {rate:.0f} jobs/s")
    print(f"{args.workers} workers / 1 worker: {rates[args.workers] / rates[1]:.2f}x")


if __name__ == "__main__":
    main()
