"""`afina run` end to end on the tiny model: the gate keeps or discards, the store records every stage,
the registry holds the kept model, a webhook hears of it, and a killed run resumes where it stopped."""

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from typer.testing import CliRunner

from afina.cli.main import app
from afina.store import open_store
from tests.conftest import write_jsonl


@pytest.fixture
def webhook():
    """A local HTTP server that records each JSON body it receives with its signature header."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((json.loads(body), body, self.headers.get("X-Afina-Signature")))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def write_config(tmp_path, model_dir, rows, url: str = "http://127.0.0.1:9/unreachable", **training) -> str:
    write_jsonl(tmp_path / "tickets.jsonl", rows)
    settings = {"max_steps": 16, "row_length": 256, "learning_rate": 5e-3, "eval_every": 8, "save_every": 2,
                "warmup_ratio": 0.0, "precision": "fp32", **training}
    config = {"name": "tickets", "model": str(model_dir), "data": {"path": "tickets.jsonl", "test": 0.2},
              "training": settings, "eval": {"max_new_tokens": 4, "max_examples": 16},
              "gate": {"metric": "loss"},
              "notify": {"webhook": {"url": url, "secret_env": "HOOK_SECRET", "retries": 0,
                                     "timeout_seconds": 2}}}
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(config))
    return str(path)


def test_a_better_model_is_registered_and_one_that_cannot_pass_is_discarded(tiny_model_dir, ticket_rows, tmp_path,
                                                                             afina_home, webhook, monkeypatch):
    url, received = webhook
    monkeypatch.setenv("HOOK_SECRET", "s3cret")
    config = write_config(tmp_path, tiny_model_dir, ticket_rows, url)
    kept = CliRunner().invoke(app, ["run", config])
    assert kept.exit_code == 0, kept.output
    assert "registered as tickets:1" in kept.output

    discarded = CliRunner().invoke(app, ["run", config, "gate.min_improvement=100"])
    assert discarded.exit_code == 0, discarded.output
    assert "discarded" in discarded.output

    with open_store() as store:
        runs = {run.status: run for run in store.list_runs()}
        assert set(runs) == {"succeeded", "discarded"}
        for run in runs.values():
            stages = store.stages(run.id)
            assert [s.name for s in stages] == ["validate", "split", "train", "evaluate", "gate", "register", "notify"]
            assert all(s.status == "succeeded" and s.finished_at for s in stages)
        model = store.get_model("tickets")
        assert model.version == 1 and model.run_id == runs["succeeded"].id and model.base_sha256
        assert model.gate["passed"] and model.gate["interval"][0] > 0  # loss fell beyond noise
        assert model.metrics["tuned"]["loss"] < model.metrics["base"]["loss"]
        assert [m.run_id for m in store.list_models()] == [runs["succeeded"].id]  # the discarded one is not a model
        gone = runs["discarded"]
    run_dir = afina_home / "runs" / gone.id
    assert not (run_dir / "adapter").exists() and not (run_dir / "checkpoints").exists()
    assert (run_dir / "eval.json").is_file() and (run_dir / "config.json").is_file()  # the record stays
    assert (afina_home / "runs" / runs["succeeded"].id / "adapter").is_dir()

    decisions = [body["decision"] for body, _, _ in received]
    assert decisions == ["registered", "discarded"]
    for body, raw, signature in received:  # each message is signed with the secret from the environment
        assert signature == "sha256=" + hmac.new(b"s3cret", raw, hashlib.sha256).hexdigest()
    assert "loss" in json.dumps(received[1][0])  # the figures base vs tuned

    listed = CliRunner().invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and "tickets:1" in listed.output
    promoted = CliRunner().invoke(app, ["models", "promote", "tickets:1", "production"])
    assert promoted.exit_code == 0 and "production -> tickets:1" in promoted.output
    with open_store() as store:
        assert store.get_model("tickets:production").version == 1


def test_an_unreachable_webhook_leaves_the_run_succeeded_with_a_warning(tiny_model_dir, ticket_rows, tmp_path):
    config = write_config(tmp_path, tiny_model_dir, ticket_rows, max_steps=8)
    result = CliRunner().invoke(app, ["run", config])
    assert result.exit_code == 0, result.output
    with open_store() as store:
        run = store.list_runs()[0]
        assert run.status == "succeeded"
        assert [e.kind for e in store.events(run.id) if e.level == "warning"] == ["notification_failed"]


def test_an_unknown_gate_metric_is_a_config_error_before_any_work(tiny_model_dir, ticket_rows, tmp_path, afina_home):
    config = write_config(tmp_path, tiny_model_dir, ticket_rows)
    result = CliRunner().invoke(app, ["run", config, "gate.metric=accuracy"])
    assert result.exit_code == 2
    assert "error[invalid_config]" in result.output and "exact_match" in result.output
    assert not (afina_home / "runs").exists()


def test_kill_9_during_training_then_resume_repeats_no_finished_stage(tiny_model_dir, ticket_rows, tmp_path,
                                                                      afina_home):
    config = write_config(tmp_path, tiny_model_dir, ticket_rows, max_steps=30)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    child = subprocess.Popen([sys.executable, "-c", "from afina.cli.main import app; app()", "run", config],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    checkpoints = []
    while time.time() < deadline and len(checkpoints) < 2:
        checkpoints = list(afina_home.glob("runs/*/checkpoints/step-*"))
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert len(checkpoints) >= 2, child.stderr.read().decode()[-2000:]
    run_dir = checkpoints[0].parents[1]
    with open_store() as store:
        run_id = store.list_runs()[0].id
        assert store.get_run(run_id).status == "running"
        assert store.finished_stages(run_id) == ["validate", "split"]

    resumed = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert "validate: done before, not repeated" in resumed.output and "resuming from" in resumed.output
    with open_store() as store:
        stages = store.stages(run_id)
        assert [s.name for s in stages] == ["validate", "split", "train", "evaluate", "gate", "register", "notify"]
        assert store.get_run(run_id).status in ("succeeded", "discarded")
        assert len(store.list_runs()) == 1 and len(store.list_models()) <= 1
    again = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
    assert again.exit_code == 0 and "already ended" in again.output
