"""The audit trail: events in a hash chain, each naming who acted, on what, and how it ended.

    append_event(session, None, "file_uploaded", "info", "uploaded tickets.jsonl",
                 audit_details("upload_data", "default", "file-1a2b"), actor="alice")

Every event carries a SHA-256 over its content, its id and the previous event's hash, so editing,
deleting or reordering one breaks the chain where it happened (`Store.verify_events`). Events are
appended inside the transaction of the change they record: the change and its record are kept
together or not at all.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
from datetime import UTC
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from afina.store.database import lock
from afina.store.records import Event
from afina.store.tables import EventRow, utcnow


def event_record(row: EventRow) -> Event:
    return Event(id=row.id, run_id=row.run_id, kind=row.kind, level=row.level, message=row.message,
                 details=row.details, created_at=row.created_at, actor=row.actor, hash=row.hash)


GENESIS = "0" * 64  # the previous hash of the first event


def current_actor() -> str:
    """Who is acting when no user is named: `AFINA_ACTOR`, else the OS user."""
    try:
        return os.environ.get("AFINA_ACTOR") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def event_hash(row: EventRow) -> str:
    """SHA-256 over an event's content, its id and the previous event's hash (canonical JSON)."""
    content = [row.id, row.created_at.astimezone(UTC).isoformat(), row.actor, row.run_id, row.kind,
               row.level, row.message, row.details, row.previous_hash]
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                                     default=str).encode()).hexdigest()


def audit_details(action: str, project: str, resource: str | None, outcome: str = "succeeded") -> dict[str, Any]:
    """What an audit event says besides who and when: the action, where, on what, and how it ended."""
    return {"action": action, "project": project, "resource": resource, "outcome": outcome}


def event_resources(event: Event) -> set[str]:
    """What an event is about, as `afina audit list --resource` matches it: its run, its resource,
    its model (as NAME:VERSION and as NAME)."""
    details = event.details or {}
    found = {event.run_id, details.get("resource"), details.get("model")}
    found |= {value.partition(":")[0] for value in list(found) if isinstance(value, str)}
    return {value for value in found if value}


def append_event(session: Session, run_id: str | None, kind: str, level: str, message: str,
                 details: dict[str, Any] | None, actor: str | None = None) -> EventRow:
    """Add an event at the end of the audit chain, inside the caller's transaction, naming `actor`
    (default: `current_actor()`). The chain's lock is taken last by every writer, so it never
    deadlocks with the locks taken before it."""
    lock(session.connection(), "events")
    previous = session.scalar(select(EventRow.hash).where(EventRow.hash.is_not(None))
                              .order_by(EventRow.id.desc()).limit(1))
    row = EventRow(run_id=run_id, kind=kind, level=level, message=message, details=details, actor=actor or current_actor(),
                   previous_hash=previous or GENESIS, created_at=utcnow())
    session.add(row)
    session.flush()  # the id is part of the hash
    row.hash = event_hash(row)
    session.flush()
    return row
