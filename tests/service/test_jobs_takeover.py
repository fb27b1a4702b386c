"""`kill -9` of a worker mid-training, with real processes: once its lease ends a second worker takes
the job over, resumes the run from its last checkpoint, and the trained adapter equals the adapter
of the same job run without interruption (CPU, fp32: bit for bit). On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from afina.training.checkpoints import latest_checkpoint
from afina.training.metrics import read_metrics
from tests.conftest import write_jsonl

LEASE_SECONDS = 2
RUN = {"training": {"max_steps": 24, "row_length": 128, "save_every": 2, "learning_rate": 0.01,
                    "precision": "fp32"},
       "eval": {"max_new_tokens": 4, "max_examples": 4},
       "gate": {"metric": "loss", "require_significant": False}}
AFINA = Path(sys.executable).parent / "afina"


def start_worker(store_url: str, home: Path, log: Path) -> subprocess.Popen:
    """`afina worker` in a process of its own, with a short lease."""
    env = {**os.environ, "AFINA_DATABASE_URL": store_url, "AFINA_HOME": str(home)}
    with log.open("ab") as out:
        return subprocess.Popen([str(AFINA), "worker", "--lease", str(LEASE_SECONDS), "--poll", "0.2"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def queue_job(store, data: Path, model: Path) -> str:
    stored = store.create_file(purpose="fine-tune", filename=data.name, bytes=data.stat().st_size,
                               sha256=hashlib.sha256(data.read_bytes()).hexdigest(), path=str(data), report=None)
    return store.create_job(model=str(model), training_file=stored.id, validation_file=None, hyperparameters={},
                            suffix="tickets", seed=7, metadata=None, afina_config=RUN).id


def wait_for(condition, what: str, timeout: float = 240, logs: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}\n" + (logs.read_text()[-3000:] if logs else ""))


def first_checkpoint(store, job_id: str) -> Path | None:
    run_id = store.get_job(job_id).run_id
    if run_id is None:
        return None
    checkpoint = latest_checkpoint(Path(store.get_run(run_id).run_dir) / "checkpoints")
    return checkpoint.path if checkpoint else None


def finished(store, *job_ids: str) -> bool:
    return all(store.get_job(job_id).finished for job_id in job_ids)


def run_dir_of(store, job_id: str) -> Path:
    return Path(store.get_run(store.get_job(job_id).run_id).run_dir)


def trained_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir / "metrics.jsonl") if row["split"] == "train"]


def test_a_killed_workers_job_is_taken_over_and_ends_as_if_never_interrupted(store, store_url, tiny_model_dir,
                                                                             ticket_rows, tmp_path):
    data = write_jsonl(tmp_path / "tickets.jsonl", ticket_rows)
    home, log = tmp_path / "home", tmp_path / "workers.log"
    killed_job = queue_job(store, data, tiny_model_dir)

    first = start_worker(store_url, home, log)
    try:
        checkpoint = wait_for(lambda: first_checkpoint(store, killed_job), "a first checkpoint", logs=log)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        first.kill()
    killed_at = latest_checkpoint(checkpoint.parent).step
    assert killed_at < RUN["training"]["max_steps"] and store.get_job(killed_job).status == "running"

    uninterrupted_job = queue_job(store, data, tiny_model_dir)
    second = start_worker(store_url, home, log)
    try:
        wait_for(lambda: finished(store, killed_job, uninterrupted_job), "both jobs to end", logs=log)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)

    taken_over, uninterrupted = store.get_job(killed_job), store.get_job(uninterrupted_job)
    assert taken_over.status == uninterrupted.status == "succeeded", (taken_over.error, log.read_text()[-3000:])
    assert taken_over.attempts == 2 and uninterrupted.attempts == 1
    messages = [event.message for event in store.job_events(killed_job)]
    assert any("whose lease expired" in m for m in messages) and any(m.startswith("resuming run") for m in messages)
    steps = trained_steps(run_dir_of(store, killed_job))  # the killed worker's, then the second one's
    last = RUN["training"]["max_steps"]
    assert steps[-(last - killed_at):] == list(range(killed_at + 1, last + 1))  # resumed after the checkpoint
    assert all(steps.count(step) == 1 for step in range(1, killed_at + 1))  # nothing before it trained again
    resumed, fresh = (load_file(run_dir_of(store, job) / "adapter" / "adapter_model.safetensors")
                      for job in (killed_job, uninterrupted_job))
    assert resumed.keys() == fresh.keys() and resumed
    for name in fresh:
        assert torch.equal(resumed[name], fresh[name]), name
