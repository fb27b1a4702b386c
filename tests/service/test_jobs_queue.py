"""The jobs queue on SQLite and PostgreSQL: every job claimed once by concurrent workers, leases that
expire hand a job over, cancel stops a running job, API keys are kept hashed."""

from __future__ import annotations

import threading
import time
from collections import Counter

from afina.jobs.keys import hash_api_key, new_api_key
from afina.jobs.worker import JobContext, JobOutcome, Worker


def queued_jobs(store, count: int) -> list[str]:
    file = store.create_file(purpose="fine-tune", filename="d.jsonl", bytes=1, sha256="a" * 64, path="/nowhere",
                             report=None)
    return [store.create_job(model="default", training_file=file.id, validation_file=None, hyperparameters={},
                             suffix=None, seed=None, metadata=None, afina_config={}).id for _ in range(count)]


def test_two_workers_claim_every_job_exactly_once(store):
    ids = queued_jobs(store, 20)
    ran: Counter = Counter()
    lock = threading.Lock()

    def no_op(context: JobContext) -> JobOutcome:
        with lock:
            ran[context.job.id] += 1
        return JobOutcome("succeeded", fine_tuned_model=f"ft:default::{context.job.id}")

    stop = threading.Event()
    workers = [Worker(store, name=f"w{i}", run_job=no_op, poll_seconds=0.05) for i in range(2)]
    threads = [threading.Thread(target=w.run_forever, args=(stop,)) for w in workers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while sum(ran.values()) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    assert ran == Counter({job_id: 1 for job_id in ids})
    jobs = [store.get_job(job_id) for job_id in ids]
    assert {job.status for job in jobs} == {"succeeded"} and {job.attempts for job in jobs} == {1}
    assert sum(w.jobs_run for w in workers) == 20 and store.claim_job("w3", 60) is None


def test_an_expired_lease_hands_the_job_to_another_worker(store):
    [job_id] = queued_jobs(store, 1)
    first = store.claim_job("dead", lease_seconds=0.2)
    assert first.id == job_id and store.claim_job("other", 60) is None  # leased: nobody else takes it
    time.sleep(0.4)
    second = store.claim_job("alive", lease_seconds=60)
    assert second.id == job_id and second.worker == "alive" and second.attempts == 2
    assert not store.renew_lease(job_id, "dead", 60)  # the dead worker, back, learns it lost the job
    assert not store.finish_job(job_id, "dead", "failed", error={"code": "x", "message": "x", "param": None})
    assert store.finish_job(job_id, "alive", "succeeded", fine_tuned_model="ft:default::x")
    assert store.get_job(job_id).status == "succeeded"
    assert any("taken over from dead" in e.message for e in store.job_events(job_id))


def test_cancel_stops_a_running_job(store):
    [job_id] = queued_jobs(store, 1)
    started, stopped = threading.Event(), threading.Event()

    def long_job(context: JobContext) -> JobOutcome:
        started.set()
        while True:  # a step at a time, checking the flag between steps
            context.check_cancelled()
            time.sleep(0.02)

    worker = Worker(store, name="w", run_job=long_job, lease_seconds=0.3)
    thread = threading.Thread(target=lambda: (worker.run_next(), stopped.set()))
    thread.start()
    assert started.wait(10)
    assert store.cancel_job(job_id).status == "cancelled"
    assert stopped.wait(10)  # noticed at the next heartbeat
    thread.join()
    job = store.get_job(job_id)
    assert job.status == "cancelled" and job.fine_tuned_model is None


def test_a_failing_job_records_its_error_and_the_worker_goes_on(store):
    ids = queued_jobs(store, 2)

    def broken(context: JobContext) -> JobOutcome:
        raise RuntimeError("boom")

    worker = Worker(store, name="w", run_job=broken)
    assert worker.run_next() and worker.run_next() and not worker.run_next()
    for job_id in ids:
        job = store.get_job(job_id)
        assert job.status == "failed" and job.error["code"] == "internal_error" and "boom" in job.error["message"]


def test_api_keys_are_kept_hashed_and_revocable(store):
    key = new_api_key()
    assert key.startswith("afn-") and len(key) > 40
    store.create_api_key("ci", hash_api_key(key))
    assert store.find_api_key(hash_api_key(key)).name == "ci"
    assert store.find_api_key(hash_api_key(key + "x")) is None
    store.revoke_api_keys("ci")
    assert store.find_api_key(hash_api_key(key)) is None
