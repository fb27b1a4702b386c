"""The store checks `by=` with the permission check it was handed (`afina.security.permissions`), and
a store handed none refuses every `by=` call, before anything changes, with the refusal audited."""

from __future__ import annotations

import pytest

import afina.sealing
from afina.errors import AfinaError
from afina.sealing import PlainFiles, sealed_files
from afina.security.encryption import ENCRYPTED_FILES
from afina.security.permissions import authorize
from afina.service.jobs_api import JobsSettings, create_jobs_app
from tests.service.test_store import new_model


def test_a_store_without_a_permission_check_refuses_every_by(store):
    store.add_user("ada", role="admin")
    new_model(store)
    with pytest.raises(AfinaError) as raised:
        store.promote("tickets", "production", by=store.principal("ada"))
    assert raised.value.code == "permissions_not_set_up"
    assert store.get_model("tickets").aliases == ()  # nothing changed
    (refused,) = store.events(kind="permission_denied")
    assert refused.actor == "ada" and refused.details["action"] == "promote_model"
    store.promote("tickets", "staging")  # afina's own steps pass no `by`


def test_the_check_handed_to_the_store_allows_and_refuses_by_role(store):
    store.add_user("ada", role="admin")
    store.add_user("val", role="viewer")
    new_model(store)
    store.check_permissions_with(authorize)
    with pytest.raises(AfinaError) as raised:
        store.promote("tickets", "production", by=store.principal("val"))
    assert raised.value.code == "permission_denied"
    assert store.promote("tickets", "production", by=store.principal("ada")).aliases == ("production",)
    assert [e.actor for e in store.events(kind="permission_denied")] == ["val"]


def test_the_jobs_api_hands_its_store_the_check_and_the_process_its_encryption(store, monkeypatch):
    monkeypatch.setattr(afina.sealing, "_handed_down", PlainFiles())
    store.add_user("ada", role="admin")
    new_model(store)
    create_jobs_app(store, JobsSettings(workers=0))
    assert sealed_files() is ENCRYPTED_FILES
    assert store.promote("tickets", "production", by=store.principal("ada")).aliases == ("production",)
