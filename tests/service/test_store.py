"""The store on SQLite and PostgreSQL: migrations on a blank database, each method's behaviour,
resumable stages, version numbering under concurrency, and the errors a user sees."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from datetime import timezone

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from afina.errors import AfinaError
from afina.store import DataFile, open_store
from afina.store.database import alembic_config, parse_url
from afina.store.tables import Base

TABLES = {"data_files", "runs", "run_data", "stages", "events", "models", "aliases", "files", "jobs", "job_events", "api_keys",
          "users", "memberships"}


def new_run(store, run_id="tickets-1", **fields):
    defaults = dict(name="tickets", config={"method": {"method": "lora", "r": 8}}, run_dir=f"/runs/{run_id}",
                    base_model="bundled:smollm2-135m")
    return store.create_run(run_id, **{**defaults, **fields})


def new_model(store, name="tickets", run_id=None, **fields):
    defaults = dict(run_id=run_id, base_model="bundled:smollm2-135m", base_sha256="b" * 64,
                    data_hashes={"train": ["a" * 64]}, config={"training": {"learning_rate": 2e-4}},
                    metrics={"exact_match": {"base": 0.1, "tuned": 0.7}},
                    gate={"decision": "keep", "improvement": 0.6, "interval": [0.5, 0.7]},
                    artifacts={"adapter": "/runs/x/adapter"})
    return store.register_model(name, **{**defaults, **fields})


# migrations


def test_migrations_on_a_blank_database_create_exactly_the_tables(store_url):
    open_store(store_url).close()
    engine = create_engine(parse_url(store_url))
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == ScriptDirectory.from_config(alembic_config()).get_current_head()
        assert set(inspect(connection).get_table_names()) == TABLES | {"alembic_version"}
    engine.dispose()
    with open_store(store_url):  # a second open finds the schema up to date
        pass


def test_migrations_downgrade_to_a_blank_database(store_url):
    open_store(store_url).close()
    engine = create_engine(parse_url(store_url))
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection=connection), "base")
    with engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) == {"alembic_version"}
    engine.dispose()


def test_a_store_from_a_newer_afina_is_refused(store_url):
    open_store(store_url).close()
    engine = create_engine(parse_url(store_url))
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    with pytest.raises(AfinaError) as raised:
        open_store(store_url)
    assert raised.value.code == "store_unavailable" and "newer" in raised.value.message


def test_concurrent_first_use_migrates_once(store_url, tmp_path):
    """Two processes open the same blank database at once and register versions of one model."""
    script = ("import sys; from afina.store import open_store\n"
              "store = open_store(sys.argv[1])\n"
              "for _ in range(5):\n"
              "    store.register_model('tickets', run_id=None, base_model='m', base_sha256=None, data_hashes={},\n"
              "                         config={}, metrics={}, gate={}, artifacts={})\n")
    workers = [subprocess.Popen([sys.executable, "-c", script, store_url], stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    for worker in workers:
        assert worker.wait(timeout=60) == 0, worker.stderr.read()
    with open_store(store_url) as store:
        assert [m.version for m in store.list_models("tickets")] == list(range(1, 11))


# data files and runs


def test_a_data_file_is_recorded_once_per_content(store):
    first = store.record_data_file("a" * 64, "/data/tickets.jsonl", "jsonl", 40, report={"invalid": 0, "codes": {}})
    again = store.record_data_file("a" * 64, "/elsewhere/copy.jsonl", "jsonl", 40)
    other = store.record_data_file("c" * 64, "/data/test.csv", "csv", 10)
    assert again == first and first.path == "/data/tickets.jsonl" and first.report == {"invalid": 0, "codes": {}}
    assert other.id != first.id and isinstance(first, DataFile)


def test_a_run_moves_through_its_statuses(store):
    train = store.record_data_file("a" * 64, "/data/tickets.jsonl", "jsonl", 40)
    test = store.record_data_file("c" * 64, "/data/test.jsonl", "jsonl", 10)
    run = new_run(store, data={"train": [train], "test": [test]})
    assert (run.status, run.finished_at, run.decision) == ("pending", None, None)
    assert run.created_at.tzinfo == timezone.utc and run.config == {"method": {"method": "lora", "r": 8}}
    assert [(d.role, d.data_file.sha256) for d in store.run_data(run.id)] == [("test", "c" * 64), ("train", "a" * 64)]

    store.set_run_status(run.id, "running")
    failed = store.set_run_status(run.id, "failed", error_code="out_of_memory", error_message="CUDA out of memory")
    assert failed.finished_at is not None and failed.error_code == "out_of_memory"
    resumed = store.set_run_status(run.id, "running")
    assert resumed.finished_at is None and resumed.error_code is None
    done = store.set_run_status(run.id, "discarded", decision="discard", metric_name="exact_match", metric_value=0.25)
    assert store.get_run(run.id) == done
    assert (done.status, done.decision, done.metric_name) == ("discarded", "discard", "exact_match")
    assert done.metric_value == 0.25
    assert done.finished_at.tzinfo == timezone.utc and done.finished_at >= done.created_at


def test_runs_are_listed_newest_first(store):
    for i in range(3):
        new_run(store, f"tickets-{i}", name="tickets" if i < 2 else "invoices")
    store.set_run_status("tickets-1", "succeeded")
    assert [r.id for r in store.list_runs()] == ["tickets-2", "tickets-1", "tickets-0"]
    assert [r.id for r in store.list_runs(status="succeeded")] == ["tickets-1"]
    assert [r.id for r in store.list_runs(name="tickets", limit=1)] == ["tickets-1"]


def test_unknown_or_repeated_runs_are_errors(store):
    new_run(store)
    with pytest.raises(AfinaError) as raised:
        new_run(store)
    assert raised.value.code == "run_exists"
    for call in (lambda: store.get_run("nope"), lambda: store.set_run_status("nope", "running"),
                 lambda: store.start_stage("nope", "train")):
        with pytest.raises(AfinaError) as raised:
            call()
        assert raised.value.code == "run_not_found"
    with pytest.raises(ValueError, match="run status"):
        store.set_run_status("tickets-1", "exploded")


def test_a_failed_change_leaves_nothing_behind(store):
    ghost = DataFile(id=999, sha256="d" * 64, path="/nowhere", format="jsonl", rows=1, report=None,
                     created_at=None)  # never recorded: the run's data row cannot point at it
    with pytest.raises(IntegrityError):
        new_run(store, data={"train": [ghost]})
    with pytest.raises(AfinaError):
        store.get_run("tickets-1")


# stages and events


def test_finishing_a_stage_twice_records_it_once(store):
    run = new_run(store)
    started = store.start_stage(run.id, "validate")
    assert (started.status, started.finished_at) == ("running", None)
    first = store.finish_stage(run.id, "validate", "succeeded", figures={"rows": 40, "invalid": 0})
    again = store.finish_stage(run.id, "validate", "succeeded", figures={"rows": 41})
    assert again == first and first.figures == {"rows": 40, "invalid": 0} and first.done
    assert [s.name for s in store.stages(run.id)] == ["validate"]
    assert store.finished_stages(run.id) == ["validate"]
    with pytest.raises(ValueError, match="already succeeded"):
        store.start_stage(run.id, "validate")
    with pytest.raises(ValueError, match="already succeeded"):
        store.finish_stage(run.id, "validate", "failed")


def test_a_cut_off_or_failed_stage_starts_again(store):
    run = new_run(store)
    store.finish_stage(run.id, "notify", "skipped", message="no notify section")  # never started
    store.start_stage(run.id, "split")
    store.finish_stage(run.id, "split", "succeeded", figures={"train": 32, "validation": 4, "test": 4})
    store.start_stage(run.id, "train")  # the process is killed here: the stage stays running
    assert store.finished_stages(run.id) == ["split", "notify"]
    restarted = store.start_stage(run.id, "train")
    assert restarted.status == "running"
    store.finish_stage(run.id, "train", "failed", message="diverged")
    store.start_stage(run.id, "train")
    retrained = store.finish_stage(run.id, "train", "succeeded", figures={"loss": 0.41})
    assert retrained.message is None and retrained.figures == {"loss": 0.41}
    assert [(s.name, s.status) for s in store.stages(run.id)] == [
        ("split", "succeeded"), ("train", "succeeded"), ("notify", "skipped")]
    assert store.finished_stages(run.id) == ["split", "train", "notify"]
    with pytest.raises(ValueError, match="stage"):
        store.start_stage(run.id, "deploy")


def test_events_are_kept_in_order(store):
    run = new_run(store)
    store.add_event("test_overlap", "3 test rows also appear in training data", run_id=run.id, level="warning",
                    details={"rows": [1, 5, 9]})
    store.add_event("notify_failed", "webhook: connection refused", run_id=run.id, level="warning")
    store.add_event("store_opened", "not tied to a run")
    events = store.events(run.id)
    assert [e.kind for e in events] == ["run_started", "test_overlap", "notify_failed"]  # a run's start is audited
    assert events[1].details == {"rows": [1, 5, 9]} and events[1].created_at.tzinfo == timezone.utc
    assert [e.kind for e in store.events(kind="store_opened")] == ["store_opened"]
    assert len(store.events()) == 4
    with pytest.raises(ValueError, match="event level"):
        store.add_event("x", "y", level="loud")


# models


def test_versions_count_up_per_name_and_keep_their_lineage(store):
    run = new_run(store)
    first = new_model(store, run_id=run.id, metrics={"exact_match": {"base": 0.1, "tuned": 0.7}, "note": "é ✓"})
    second = new_model(store, run_id=run.id)
    other = new_model(store, name="invoices")
    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert store.get_model("tickets") == second and store.get_model("tickets:1") == first
    assert first.metrics["note"] == "é ✓" and first.gate["interval"] == [0.5, 0.7] and first.run_id == run.id
    assert first.afina_version and first.status == "registered" and first.ref == "tickets:1"
    assert [m.ref for m in store.list_models()] == ["invoices:1", "tickets:1", "tickets:2"]
    assert [e.kind for e in store.events(run.id)] == ["run_started", "model_registered", "model_registered"]


def test_concurrent_registrations_never_share_a_version(store_url):
    stores = [open_store(store_url) for _ in range(4)]
    errors = []

    def register(store):
        try:
            for _ in range(5):
                new_model(store)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=register, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(m.version for m in stores[0].list_models("tickets")) == list(range(1, 21))
    for store in stores:
        store.close()


def test_promoting_moves_the_alias(store):
    for _ in range(3):
        new_model(store)
    assert store.promote("tickets", "production", 1).aliases == ("production",)
    assert store.get_model("tickets:production").version == 1
    moved = store.promote("tickets", "production")  # the newest version by default
    assert moved.version == 3 and moved.aliases == ("production",)
    assert store.get_model("tickets:production").version == 3 and store.get_model("tickets:1").aliases == ()
    store.promote("tickets", "staging", 3)
    assert store.get_model("tickets:3").aliases == ("production", "staging")
    promoted = [e.details for e in store.events(kind="model_promoted")]
    assert promoted[1] == {"model": "tickets:3", "alias": "production", "previous_version": 1}
    with pytest.raises(AfinaError) as raised:
        store.promote("tickets", "9lives", 1)
    assert raised.value.code == "bad_alias"
    with pytest.raises(AfinaError) as raised:
        store.promote("tickets", "production", 7)
    assert raised.value.code == "model_not_found"


def test_deleting_a_model_keeps_its_record(store):
    for _ in range(3):
        new_model(store)
    store.promote("tickets", "production", 3)
    deleted = store.delete_model("tickets:production")
    assert (deleted.version, deleted.status, deleted.aliases) == (3, "deleted", ())
    assert store.delete_model("tickets:3") == deleted  # deleting again changes nothing
    assert store.get_model("tickets:3").metrics == {"exact_match": {"base": 0.1, "tuned": 0.7}}
    assert store.get_model("tickets").version == 2  # the newest registered version
    assert [m.version for m in store.list_models("tickets")] == [1, 2]
    assert [m.version for m in store.list_models("tickets", include_deleted=True)] == [1, 2, 3]
    assert new_model(store).version == 4  # a deleted version's number is not reused
    with pytest.raises(AfinaError) as raised:
        store.get_model("tickets:production")
    assert raised.value.code == "model_not_found"
    with pytest.raises(AfinaError) as raised:
        store.promote("tickets", "production", 3)
    assert raised.value.code == "model_deleted"
    assert store.events(kind="model_deleted")[0].details == {"model": "tickets:3", "aliases": ["production"]}


def test_unknown_models_and_bad_names_are_errors(store):
    for ref in ("tickets", "tickets:1", "tickets:production"):
        with pytest.raises(AfinaError) as raised:
            store.get_model(ref)
        assert raised.value.code == "model_not_found" and "afina models list" in raised.value.hint
    for name in ("", "tickets:2", "../etc", "a b"):
        with pytest.raises(AfinaError) as raised:
            new_model(store, name=name)
        assert raised.value.code == "bad_model_name"


# where the store lives, and when it cannot be opened


def test_the_default_store_is_sqlite_in_the_afina_home(afina_home, monkeypatch):
    monkeypatch.delenv("AFINA_DATABASE_URL", raising=False)
    assert not afina_home.exists()
    with open_store() as store:
        new_run(store)
    path = afina_home / "afina.db"
    connection = sqlite3.connect(path)
    assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert connection.execute("SELECT id FROM runs").fetchall() == [("tickets-1",)]
    connection.close()


def test_the_store_url_comes_from_the_environment(afina_home, monkeypatch, tmp_path):
    monkeypatch.setenv("AFINA_DATABASE_URL", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    with open_store() as store:
        assert store.url.endswith("elsewhere.db") and store.dialect == "sqlite"
    assert (tmp_path / "elsewhere.db").exists() and not afina_home.exists()


def test_the_database_enforces_foreign_keys(store):
    with pytest.raises(IntegrityError):
        store.add_event("x", "an event of a run that does not exist", run_id="nope")
    assert store.events() == []


@pytest.mark.parametrize("url, shown", [
    ("not a url", "not a url"),
    ("mysql://alice:secret@db.internal/afina", "mysql://alice:***@db.internal/afina"),
    ("postgresql://alice:secret@127.0.0.1:1/afina", "postgresql+psycopg://alice:***@127.0.0.1:1/afina"),
    ("sqlite:////no/such/directory/afina.db", "sqlite:////no/such/directory/afina.db"),
])
def test_a_store_that_cannot_be_opened_is_an_afina_error(url, shown):
    with pytest.raises(AfinaError) as raised:
        open_store(url)
    assert raised.value.code == "store_unavailable" and raised.value.location == shown
    assert "secret" not in str(raised.value) and "Traceback" not in str(raised.value)


def test_an_afina_home_that_is_a_file_is_an_afina_error(afina_home, monkeypatch):
    monkeypatch.delenv("AFINA_DATABASE_URL", raising=False)
    afina_home.write_text("not a directory")
    with pytest.raises(AfinaError) as raised:
        open_store()
    assert raised.value.code == "store_unavailable" and raised.value.location == str(afina_home)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_afina_home_is_an_afina_error(afina_home, monkeypatch):
    monkeypatch.delenv("AFINA_DATABASE_URL", raising=False)
    afina_home.mkdir()
    afina_home.chmod(0o500)
    try:
        with pytest.raises(AfinaError) as raised:
            open_store()
    finally:
        afina_home.chmod(0o700)
    assert raised.value.code == "store_unavailable" and str(afina_home) in raised.value.location
