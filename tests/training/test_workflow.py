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


def running_stage() -> tuple[str | None, str | None]:
    """The run id and the stage the store says is running now (the test reads the store as users do)."""
    with open_store() as store:
        runs = store.list_runs()
        if not runs:
            return None, None
        running = [s.name for s in store.stages(runs[0].id) if s.status == "running"]
        return runs[0].id, running[0] if running else None


@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_kill_9_in_a_stage_then_resume_repeats_no_finished_stage(stage, tiny_model_dir, ticket_rows, tmp_path,
                                                                 afina_home):
    config = write_config(tmp_path, tiny_model_dir, ticket_rows, max_steps=30)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    child = subprocess.Popen([sys.executable, "-c", "from afina.cli.main import app; app()", "run", config,
                              "eval.max_new_tokens=24"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    run_id = current = None
    while time.time() < deadline and child.poll() is None:
        run_id, current = running_stage()
        # in training: once two checkpoints exist; in evaluation: as soon as it starts
        if current == stage and (stage != "train" or len(list(afina_home.glob("runs/*/checkpoints/step-*"))) >= 2):
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert current == stage, child.stderr.read().decode()[-2000:]
    run_dir = afina_home / "runs" / run_id
    with open_store() as store:
        assert store.get_run(run_id).status == "running"
        finished = store.finished_stages(run_id)
        assert finished == ["validate", "split"] + (["train"] if stage == "evaluate" else [])
        finished_at = {s.name: s.finished_at for s in store.stages(run_id) if s.name in finished}

    resumed = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
    assert resumed.exit_code == 0, resumed.output
    assert "validate: done before, not repeated" in resumed.output
    assert ("resuming from" in resumed.output) == (stage == "train")
    with open_store() as store:
        stages = store.stages(run_id)
        assert [s.name for s in stages] == ["validate", "split", "train", "evaluate", "gate", "register", "notify"]
        assert all(s.finished_at == finished_at[s.name] for s in stages if s.name in finished)  # not redone
        assert store.get_run(run_id).status in ("succeeded", "discarded")
        assert len(store.list_runs()) == 1 and len(store.list_models()) <= 1
    again = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
    assert again.exit_code == 0 and "already ended" in again.output


def test_a_crash_after_registering_resumes_without_a_second_version(tiny_model_dir, ticket_rows, tmp_path,
                                                                     afina_home):
    """kill -9 between writing the model's record and marking the register stage finished: the two are
    separate transactions, so the resumed run must find the model instead of registering it again."""
    import sqlite3

    config = write_config(tmp_path, tiny_model_dir, ticket_rows, max_steps=8)
    assert CliRunner().invoke(app, ["run", config]).exit_code == 0
    with open_store() as store:
        run = store.list_runs()[0]
    with sqlite3.connect(afina_home / "afina.db") as db:  # the state such a crash leaves
        db.execute("UPDATE stages SET status = 'running', finished_at = NULL "
                   "WHERE run_id = ? AND name IN ('register', 'notify')", (run.id,))
        db.execute("UPDATE runs SET status = 'running', finished_at = NULL WHERE id = ?", (run.id,))
    resumed = CliRunner().invoke(app, ["run", "--resume", str(afina_home / "runs" / run.id)])
    assert resumed.exit_code == 0, resumed.output
    assert "already registered as tickets:1" in resumed.output
    with open_store() as store:
        assert [(m.name, m.version) for m in store.list_models(include_deleted=True)] == [("tickets", 1)]
        assert store.get_run(run.id).status == "succeeded"
        assert [s.status for s in store.stages(run.id)] == ["succeeded"] * 7


def test_a_gate_on_a_metric_the_objective_cannot_score_is_refused_before_any_work(tiny_model_dir, ticket_rows,
                                                                                  tmp_path, afina_home):
    config = write_config(tmp_path, tiny_model_dir, ticket_rows)
    result = CliRunner().invoke(app, ["run", config, "gate.metric=preference_accuracy"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error[")]
    assert len(errors) == 1 and errors[0].startswith("error[gate_metric_unavailable] at gate.metric")
    assert "exact_match" in result.output and not (afina_home / "runs").exists()


def test_the_forgetting_check_and_eval_on_any_file(tiny_model_dir, ticket_rows, tmp_path, afina_home):
    write_jsonl(tmp_path / "general.jsonl", ticket_rows[:10])
    config = write_config(tmp_path, tiny_model_dir, ticket_rows, max_steps=8)
    result = CliRunner().invoke(app, ["run", config, "gate.general_data=" + str(tmp_path / "general.jsonl"),
                                      "gate.max_general_loss_increase=0.0"])
    assert result.exit_code == 0, result.output
    run_dir = next((afina_home / "runs").iterdir())
    report = json.loads((run_dir / "eval.json").read_text())
    general = report["general"]
    assert general["tuned_loss"] < general["base_loss"]  # the general rows are tickets here: nothing forgotten
    with open_store() as store:
        gate = store.get_model("tickets").gate
    assert gate["general"]["passed"] and gate["general"]["base_loss"] == pytest.approx(general["base_loss"])

    other = write_jsonl(tmp_path / "other.jsonl", ticket_rows[10:16])
    evaluated = CliRunner().invoke(app, ["eval", str(run_dir), "--data", str(other)])
    assert evaluated.exit_code == 0, evaluated.output
    on_file = json.loads((run_dir / "eval-other.json").read_text())
    assert on_file["data"] == str(other) and on_file["base"]["examples"] == 6 == on_file["tuned"]["examples"]
    assert on_file["tuned"]["loss"] < on_file["base"]["loss"]

    (tmp_path / "broken.jsonl").write_text('{"messages": [}\n')
    broken = CliRunner().invoke(app, ["eval", str(run_dir), "--data", str(tmp_path / "broken.jsonl")])
    assert broken.exit_code == 2 and "error[invalid_json]" in broken.output and "broken.jsonl:1" in broken.output
