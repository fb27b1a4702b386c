"""The events' audit chain: every event is hashed with the one before it, so an edited, deleted or
reordered event is found. On SQLite and on PostgreSQL."""

from sqlalchemy import create_engine, text

from tests.service.test_store import new_model, new_run


def tamper(store_url: str, *statements: str) -> None:
    """Change the events table behind the store's back, as someone with database access could."""
    engine = create_engine(store_url)
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))
    engine.dispose()


def fill(store):
    new_run(store)
    new_model(store, run_id="tickets-1")
    store.promote("tickets", "production")
    store.add_event("notify_failed", "webhook not delivered", run_id="tickets-1", level="warning")
    store.delete_model("tickets:1")
    return [event.id for event in store.events()]


def test_an_untouched_chain_verifies_and_names_who_acted(store, monkeypatch):
    monkeypatch.setenv("AFINA_ACTOR", "maria@example.com")
    ids = fill(store)
    events = store.events()
    assert [e.kind for e in events] == ["run_started", "model_registered", "model_promoted", "notify_failed",
                                        "model_deleted"]
    assert {e.actor for e in events} == {"maria@example.com"} and all(len(e.hash) == 64 for e in events)
    check = store.verify_events()
    assert check.ok and check.checked == len(ids) and check.last_hash == events[-1].hash


def test_an_edited_event_breaks_the_chain_at_that_event(store, store_url):
    ids = fill(store)
    tamper(store_url, f"UPDATE events SET message = 'nothing happened' WHERE id = {ids[2]}")
    check = store.verify_events()
    assert not check.ok and check.broken_at == ids[2] and "edited" in check.reason


def test_a_deleted_event_breaks_the_chain_after_it(store, store_url):
    ids = fill(store)
    tamper(store_url, f"DELETE FROM events WHERE id = {ids[1]}")
    check = store.verify_events()
    assert not check.ok and check.broken_at == ids[2] and "deleted or moved" in check.reason


def test_reordered_events_break_the_chain(store, store_url):
    ids = fill(store)
    a, b = ids[1], ids[3]
    tamper(store_url, f"UPDATE events SET id = -1 WHERE id = {a}", f"UPDATE events SET id = {a} WHERE id = {b}",
           f"UPDATE events SET id = {b} WHERE id = -1")
    check = store.verify_events()
    assert not check.ok and check.broken_at == a


def test_events_added_concurrently_form_one_chain(store_url):
    import threading

    from afina.store import open_store

    with open_store(store_url) as first, open_store(store_url) as second:
        def add(store, who):
            for i in range(15):
                store.add_event("note", f"{who} {i}")

        threads = [threading.Thread(target=add, args=(s, w)) for s, w in ((first, "a"), (second, "b"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        check = first.verify_events()
    assert check.ok and check.checked == 30


def test_afina_audit_verify_exits_1_on_a_broken_chain(afina_home):
    from typer.testing import CliRunner

    from afina.cli.main import app
    from afina.store import open_store

    with open_store() as store:
        fill(store)
    intact = CliRunner().invoke(app, ["audit", "verify"])
    assert intact.exit_code == 0 and "intact: 5 events" in intact.output
    assert "run_started" in CliRunner().invoke(app, ["audit", "list"]).output
    tamper(f"sqlite:///{afina_home / 'afina.db'}", "UPDATE events SET actor = 'someone else' WHERE kind = 'model_promoted'")
    broken = CliRunner().invoke(app, ["audit", "verify"])
    assert broken.exit_code == 1 and "broken at event 3" in broken.output
