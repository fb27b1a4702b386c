"""The fine-tuning API through the official `openai` client against a real server: upload, create,
follow to succeeded, checkpoints, cancel (a running job stops within a training step, keeping its
checkpoint); and the errors: 400 with afina's codes, 401, 404, 413, none of which leaves a row or a
file behind."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import uvicorn

from afina.jobs.files import files_dir
from afina.jobs.keys import hash_api_key, new_api_key
from afina.service.jobs_api import JobsSettings, create_jobs_app
from afina.store import open_store
from afina.training.checkpoints import latest_checkpoint
from afina.training.metrics import read_metrics

MAX_UPLOAD = 64 * 2**10
RUN = {"training": {"max_steps": 2, "row_length": 128, "save_every": 1, "keep_checkpoints": 5},
       "eval": {"max_new_tokens": 4, "max_examples": 4},
       "gate": {"metric": "loss", "require_significant": False}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def jobs_server(tmp_path, settings: JobsSettings) -> Iterator[tuple[str, str, object]]:
    """A jobs server in a thread on a SQLite store: its URL, a valid key and the store."""
    store = open_store(f"sqlite:///{tmp_path / 'jobs.db'}")
    key = new_api_key()
    store.create_api_key("tests", hash_api_key(key))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_jobs_app(store, settings), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", key, store
    finally:
        uv.should_exit = True
        thread.join(10)
        store.close()


@pytest.fixture
def server(tmp_path, afina_home):
    """A jobs server with one local worker; its URL, a valid key and the store."""
    settings = JobsSettings(max_upload_bytes=MAX_UPLOAD, workers=1, poll_seconds=0.1, lease_seconds=30,
                            check_seconds=0.05)
    with jobs_server(tmp_path, settings) as running:
        yield running


@pytest.fixture
def client(server):
    url, key, _ = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def stored_files() -> list:
    return list(files_dir().iterdir()) if files_dir().exists() else []


def wait_for_status(client, job_id: str, statuses: set[str], timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status}")


def test_a_job_runs_from_upload_to_a_fine_tuned_model(client, tiny_model_dir, ticket_rows):
    uploaded = client.files.create(file=("tickets.jsonl", jsonl(ticket_rows)), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.filename == "tickets.jsonl"
    assert client.files.retrieve(uploaded.id).bytes == len(jsonl(ticket_rows))
    assert client.files.content(uploaded.id).read() == jsonl(ticket_rows)
    job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=uploaded.id, suffix="tickets",
                                         hyperparameters={"learning_rate_multiplier": 50},
                                         extra_body={"afina": RUN})
    other = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=uploaded.id,
                                           extra_body={"afina": RUN})
    assert job.status == "queued" and job.hyperparameters.learning_rate_multiplier == 50
    assert client.fine_tuning.jobs.cancel(other.id).status == "cancelled"  # queued behind the first: never runs

    done = wait_for_status(client, job.id, {"succeeded", "failed", "cancelled"})
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:{tiny_model_dir.name}:tickets:{job.id}"
    extension = done.model_extra["afina"]
    assert extension["gate"]["passed"] and extension["model"].startswith("tickets:")
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    for stage in ("validate", "split", "train", "evaluate", "gate", "register"):
        assert any(m.startswith(f"stage {stage} succeeded") for m in messages), messages
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [2, 1]
    assert wait_for_status(client, other.id, {"cancelled"}).fine_tuned_model is None
    listed = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in listed.data] == [other.id] and listed.has_more
    assert [j.id for j in client.fine_tuning.jobs.list(after=other.id, limit=5).data] == [job.id]


def trained_steps(run_dir) -> list[int]:
    return [row["step"] for row in read_metrics(run_dir / "metrics.jsonl") if row["split"] == "train"]


def test_cancel_stops_a_training_job_within_a_step_and_keeps_its_checkpoint(client, server, tiny_model_dir,
                                                                           ticket_rows):
    store = server[2]
    uploaded = client.files.create(file=("tickets.jsonl", jsonl(ticket_rows)), purpose="fine-tune")
    long_run = {**RUN, "training": {"max_steps": 500, "row_length": 128, "save_every": 1000}}
    job = client.fine_tuning.jobs.create(model=str(tiny_model_dir), training_file=uploaded.id,
                                         extra_body={"afina": long_run})
    deadline = time.monotonic() + 120
    while (run_id := store.get_job(job.id).run_id) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run_dir = Path(store.get_run(run_id).run_dir)
    while len(trained_steps(run_dir)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    steps_at_cancel = trained_steps(run_dir)[-1]
    while not any(e.message.startswith("stopped") for e in client.fine_tuning.jobs.list_events(job.id)):
        assert time.monotonic() < deadline, "the worker did not stop"
        time.sleep(0.02)
    last = trained_steps(run_dir)[-1]
    assert last - steps_at_cancel <= 2 and last < 500  # the step in progress, or the next if it just ended
    assert latest_checkpoint(run_dir / "checkpoints").step == last
    assert store.get_job(job.id).status == "cancelled"
    run = store.get_run(run_id)
    assert run.status == "interrupted" and run.error_code == "cancelled"


def test_a_bad_file_is_refused_at_upload_with_its_code(client, server):
    bad = jsonl([{"messages": [{"role": "user", "content": "hi"}]}, {"prompt": 3}])
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    assert refused.value.code and refused.value.param and "bad.jsonl" in refused.value.param
    assert client.files.list().data == [] and stored_files() == []


def test_bad_requests_get_openai_errors_and_leave_nothing(client, server, tiny_model_dir, ticket_rows):
    url = server[0]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="afn-wrong", max_retries=0).files.list()
    no_key = httpx.get(f"{url}/v1/fine_tuning/jobs")
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file-nope")
    with pytest.raises(openai.APIStatusError) as too_large:
        client.files.create(file=("big.jsonl", jsonl(ticket_rows * 40)), purpose="fine-tune")
    assert too_large.value.status_code == 413
    assert stored_files() == []

    uploaded = client.files.create(file=("tickets.jsonl", io.BytesIO(jsonl(ticket_rows))), purpose="fine-tune")
    for body, param in [({"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs"),
                        ({"hyperparameters": {"batch_size": 1.5}}, "hyperparameters.batch_size"),
                        ({"training_file": "file-nope"}, "training_file"),
                        ({"extra_body": {"afina": {"training": {"max_step": 2}}}}, "afina"),
                        ({"model": str(tiny_model_dir / "missing")}, "model")]:
        fields = {"model": str(tiny_model_dir), "training_file": uploaded.id, **body}
        with pytest.raises(openai.BadRequestError) as refused:
            client.fine_tuning.jobs.create(**fields)
        assert refused.value.param == param, refused.value.body
    assert client.fine_tuning.jobs.list().data == []

    assert client.files.delete(uploaded.id).deleted
    assert client.files.list().data == [] and stored_files() == []


def test_every_route_but_health_needs_a_key(server):
    url, _, store = server
    app = create_jobs_app(store)
    for route in app.routes:
        path = getattr(route, "path", "")
        if not path.startswith("/v1"):
            continue
        for method in route.methods:
            answer = httpx.request(method, url + path.replace("{file_id}", "file-x").replace("{job_id}", "ftjob-x"))
            assert answer.status_code == 401, (method, path)
    assert httpx.get(f"{url}/health").status_code == 200
