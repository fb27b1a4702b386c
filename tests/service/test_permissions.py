"""The permission matrix, role by role and action by action, through the API and through the CLI.

The table below is the test's own copy of what each role may do: an allowed action succeeds, a
refused one gets 403 `permission_denied` from the API and error[permission_denied] (exit 2) from
the CLI, changes nothing, and is kept in the audit trail. A change to
`afina.security.permissions.PERMISSIONS` that does not change this table fails here.
"""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from afina.cli.main import app as cli
from afina.jobs.keys import hash_api_key, new_api_key
from afina.security.permissions import ACTIONS, PERMISSIONS, authorize
from afina.service.app import create_app
from afina.service.jobs_api import JobsSettings, create_jobs_app
from afina.serving.engine import Engine
from afina.serving.loading import ModelSource, load_served_models
from afina.store import open_store
from afina.store.principals import ROLES
from tests.conftest import chat_row
from tests.service.test_store import new_model

ALLOWED = {  # action: (admin, engineer, viewer)
    "upload_data": (True, True, False),
    "read_data": (True, True, False),
    "start_job": (True, True, False),
    "cancel_job": (True, True, False),
    "read_results": (True, True, True),
    "promote_model": (True, False, False),
    "delete_model": (True, False, False),
    "use_model": (True, True, True),
    "manage_users": (True, False, False),
    "read_audit": (True, False, False),
}
CASES = [(role, action) for action in ALLOWED for role in ROLES]
DATA = b"".join(json.dumps(chat_row(f"question {i}", f"answer {i}")).encode() + b"\n" for i in range(4))


def test_the_table_covers_every_role_and_action():
    assert tuple(ALLOWED) == ACTIONS
    assert {a: tuple(r in PERMISSIONS[a] for r in ROLES) for a in ACTIONS} == ALLOWED


class World:
    """A store with an admin who set things up, one user per role in the default project and a key
    each, an uploaded file, a queued job and a registered model."""

    def __init__(self, url: str):
        self.store = open_store(url, authorize=authorize)
        self.store.add_user("ada", role="admin")
        self.keys = {}
        for role in ROLES:
            self.store.add_user(f"{role}-user", role=role)
            key = new_api_key()
            self.store.create_api_key("tests", hash_api_key(key), user=f"{role}-user")
            self.keys[role] = key
        self.file = self.store.create_file(purpose="fine-tune", filename="d.jsonl", bytes=len(DATA), sha256="a" * 64,
                                           path="/nowhere", report={})
        self.job = self.store.create_job(model="default", training_file=self.file.id, validation_file=None,
                                         hyperparameters={}, suffix=None, seed=None, metadata=None, afina_config={})
        self.model = new_model(self.store)

    def headers(self, role: str) -> dict:
        return {"Authorization": f"Bearer {self.keys[role]}"}


@pytest.fixture
def world(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("AFINA_DATABASE_URL", url)  # the CLI's store is the same one
    world = World(url)
    yield world
    world.store.close()


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    return load_served_models([ModelSource("base", str(tiny_model_dir))], device=torch.device("cpu"))


def call_api(world: World, served, role: str, action: str):
    """The action through the HTTP API, as `role`'s key."""
    headers = world.headers(role)
    if action == "use_model":
        with TestClient(create_app(Engine(served), keys=world.store)) as client:
            return client.post("/v1/completions", headers=headers,
                               json={"model": "base", "prompt": "hello", "max_tokens": 1})
    client = TestClient(create_jobs_app(world.store, JobsSettings(workers=0)))
    job, file, model = world.job.id, world.file.id, world.model.ref
    requests = {
        "upload_data": lambda: client.post("/v1/files", headers=headers, data={"purpose": "fine-tune"},
                                           files={"file": ("tickets.jsonl", DATA)}),
        "read_data": lambda: client.get(f"/v1/files/{file}", headers=headers),
        "start_job": lambda: client.post("/v1/fine_tuning/jobs", headers=headers,
                                         json={"model": "default", "training_file": file}),
        "cancel_job": lambda: client.post(f"/v1/fine_tuning/jobs/{job}/cancel", headers=headers),
        "read_results": lambda: client.get(f"/v1/fine_tuning/jobs/{job}", headers=headers),
        "promote_model": lambda: client.post(f"/v1/models/{model}/promote", headers=headers,
                                             json={"alias": "production"}),
        "delete_model": lambda: client.delete(f"/v1/models/{model}", headers=headers),
        "manage_users": lambda: client.post("/v1/users", headers=headers, json={"name": "newbie", "role": "viewer"}),
        "read_audit": lambda: client.get("/v1/audit", headers=headers),
    }
    return requests[action]()


def state(world: World) -> tuple:
    """What the actions change: files, jobs and their statuses, models and aliases, users."""
    store = world.store
    return ([f.id for f in store.list_files()], [(j.id, j.status) for j in store.list_jobs(limit=100)[0]],
            [(m.ref, m.aliases, m.status) for m in store.list_models(include_deleted=True)],
            [u.name for u in store.list_users()])


@pytest.mark.parametrize("role,action", CASES)
def test_the_api_allows_exactly_what_the_table_allows(world, served, role, action):
    before = state(world)
    response = call_api(world, served, role, action)
    if ALLOWED[action][ROLES.index(role)]:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "permission_denied"
        assert state(world) == before
        denied = world.store.events(kind="permission_denied")
        assert [(e.actor, e.details["action"], e.details["outcome"]) for e in denied] == [
            (f"{role}-user", action, "denied")]


CLI_COMMANDS = {  # actions the CLI takes on the store; data and jobs are reached through the API
    "read_results": ["models", "list"],
    "promote_model": ["models", "promote", "tickets:1", "production"],
    "delete_model": ["models", "delete", "tickets:1"],
    "use_model": ["serve", "MODEL_DIR"],
    "manage_users": ["users", "add", "newbie", "--role", "viewer"],
    "read_audit": ["audit", "list"],
}


def test_the_cli_has_a_command_for_every_action_but_data_and_jobs():
    assert set(ACTIONS) - set(CLI_COMMANDS) == {"upload_data", "read_data", "start_job", "cancel_job"}


@pytest.mark.parametrize("role,action", [(r, a) for r, a in CASES if a in CLI_COMMANDS])
def test_the_cli_allows_exactly_what_the_table_allows(world, tiny_model_dir, monkeypatch, role, action):
    served_apps = []
    monkeypatch.setattr("afina.service.tls.serve_app", lambda app, **where: served_apps.append(app))
    args = [str(tiny_model_dir) if a == "MODEL_DIR" else a for a in CLI_COMMANDS[action]]
    before = state(world)
    result = CliRunner().invoke(cli, args, env={"AFINA_USER": f"{role}-user"})
    if ALLOWED[action][ROLES.index(role)]:
        assert result.exit_code == 0, result.output
        assert served_apps if action == "use_model" else not served_apps
    else:
        assert result.exit_code == 2 and "error[permission_denied]" in result.output, result.output
        assert state(world) == before and not served_apps
        assert [e.actor for e in world.store.events(kind="permission_denied")] == [f"{role}-user"]


def test_the_cli_names_its_user_once_the_store_has_users(world):
    result = CliRunner().invoke(cli, ["models", "list"], env={"AFINA_USER": None})
    assert result.exit_code == 2 and "error[user_required]" in result.output
    result = CliRunner().invoke(cli, ["models", "list"], env={"AFINA_USER": "nobody"})
    assert result.exit_code == 2 and "error[user_not_found]" in result.output


def test_a_store_without_users_is_run_by_its_owner(tmp_path, monkeypatch):
    monkeypatch.setenv("AFINA_DATABASE_URL", f"sqlite:///{tmp_path / 'solo.db'}")
    monkeypatch.delenv("AFINA_USER", raising=False)
    assert CliRunner().invoke(cli, ["audit", "list"]).exit_code == 0
    refused = CliRunner().invoke(cli, ["users", "add", "alice", "--role", "viewer"])
    assert "error[first_user_not_admin]" in refused.output
    assert CliRunner().invoke(cli, ["users", "add", "alice", "--role", "admin"]).exit_code == 0
    assert "error[user_required]" in CliRunner().invoke(cli, ["audit", "list"]).output


def test_roles_are_scoped_to_projects(world):
    """An engineer of `legal` only: refused in the default project; in `legal`, its own files only."""
    world.store.add_user("lena", project="legal", role="engineer")
    key = new_api_key()
    world.store.create_api_key("laptop", hash_api_key(key), user="lena")
    client = TestClient(create_jobs_app(world.store, JobsSettings(workers=0)))
    as_default = {"Authorization": f"Bearer {key}"}
    as_legal = as_default | {"OpenAI-Project": "legal"}
    assert client.get("/v1/files", headers=as_default).status_code == 403
    uploaded = client.post("/v1/files", headers=as_legal, data={"purpose": "fine-tune"},
                           files={"file": ("contracts.jsonl", DATA)})
    assert uploaded.status_code == 200
    assert [f["id"] for f in client.get("/v1/files", headers=as_legal).json()["data"]] == [uploaded.json()["id"]]
    assert client.get(f"/v1/files/{world.file.id}", headers=as_legal).status_code == 404  # default's file
    job = client.post("/v1/fine_tuning/jobs", headers=as_legal, json={"model": "default",
                                                                      "training_file": world.file.id})
    assert job.status_code == 400 and job.json()["error"]["code"] == "file_not_found"
    assert client.post(f"/v1/fine_tuning/jobs/{world.job.id}/cancel", headers=as_legal).status_code == 404
    assert world.store.get_job(world.job.id).status == "queued"
    assert world.store.get_file(uploaded.json()["id"]).project == "legal"
    event = world.store.events(action="file_uploaded")[-1]
    assert (event.actor, event.details["project"], event.details["outcome"]) == ("lena", "legal", "succeeded")


def test_the_audit_list_filters_by_user_action_resource_and_time(world):
    admin = world.store.principal("ada")
    world.store.promote("tickets", "production", by=admin)
    world.store.add_user("newbie", role="viewer", by=admin)
    run = lambda *args: CliRunner().invoke(cli, ["audit", "list", *args], env={"AFINA_USER": "ada", "COLUMNS": "300"})
    by_root = run("--user", "ada", "--action", "user_added")
    assert by_root.exit_code == 0 and "newbie" in by_root.stdout and "model_promoted" not in by_root.stdout
    about_tickets = run("--resource", "tickets")
    assert "model_promoted" in about_tickets.stdout and "user_added" not in about_tickets.stdout
    assert "0 events" in run("--since", "2999-01-01").stdout
    assert "model_promoted" in run("--since", "1h").stdout
    assert [e.kind for e in world.store.events(actor="ada", action="manage_users")] == ["user_added"]
    assert "error[bad_time]" in run("--since", "yesterday").output


def test_every_serving_route_but_health_and_ready_needs_a_key(world, served):
    with TestClient(create_app(Engine(served), keys=world.store)) as client:
        paths = {(method, route.path) for route in client.app.routes for method in getattr(route, "methods", ())}
        assert ("GET", "/metrics") in paths and ("POST", "/v1/chat/completions") in paths
        for method, path in sorted(paths):
            answer = client.request(method, path)
            if path in {"/health", "/ready"}:  # open: answered without a key (ready or not yet)
                assert answer.status_code in {200, 503}, (method, path, answer.status_code)
            else:
                assert answer.status_code == 401, (method, path, answer.status_code)
        assert client.get("/metrics", headers=world.headers("viewer")).status_code == 200
        assert client.get("/docs").status_code in {401, 404}
