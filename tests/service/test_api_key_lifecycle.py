"""API keys from creation to the end: shown once and stored hashed, acting as their user, refused
(401) once expired, revoked or their user removed, each step in the audit trail; an old store
upgrades with its keys still working; and HTTPS with TLS 1.2 at least."""

from __future__ import annotations

import datetime
import http.client
import socket
import ssl
import threading
import time
import urllib.request
from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from afina.cli.main import app as cli
from afina.errors import AfinaError
from afina.jobs.keys import hash_api_key, new_api_key, parse_duration
from afina.service.jobs_api import JobsSettings, create_jobs_app
from afina.service.tls import uvicorn_config
from afina.security.permissions import authorize
from afina.store import open_store
from afina.store.database import alembic_config
from afina.store.tables import utcnow


@pytest.fixture
def store(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("AFINA_DATABASE_URL", url)
    with open_store(url, authorize=authorize) as opened:
        opened.add_user("ada", role="admin")
        opened.add_user("maria", role="engineer")
        yield opened


def status(store, key: str) -> int:
    client = TestClient(create_jobs_app(store, JobsSettings(workers=0)))
    return client.get("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {key}"}).status_code


def test_a_key_is_shown_once_stored_hashed_and_acts_as_its_owner(store, tmp_path):
    result = CliRunner().invoke(cli, ["keys", "create", "laptop", "--owner", "maria", "--expires-in", "30d"],
                                env={"AFINA_USER": "ada"})
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert key.startswith("afn-") and len(key) > 40 and key != new_api_key()
    kept = b"".join(path.read_bytes() for path in tmp_path.glob("store.db*"))  # the database and its log
    assert key.encode() not in kept and hash_api_key(key).encode() in kept  # only its hash is kept
    assert status(store, key) == 200
    found, principal = store.principal_for_key(hash_api_key(key))
    assert (found.user, principal.user, dict(principal.roles)) == ("maria", "maria", {"default": "engineer"})
    assert timedelta(days=29.9) < found.expires_at - utcnow() <= timedelta(days=30)
    listed = CliRunner().invoke(cli, ["keys", "list"], env={"AFINA_USER": "ada"})
    assert "maria" in listed.stdout and "live" in listed.stdout and key not in listed.stdout


def test_a_revoked_key_gets_401(store):
    key = new_api_key()
    store.create_api_key("ci", hash_api_key(key), user="maria", by=store.principal("ada"))
    assert status(store, key) == 200
    result = CliRunner().invoke(cli, ["keys", "revoke", "ci"], env={"AFINA_USER": "ada"})
    assert result.exit_code == 0, result.output
    assert status(store, key) == 401
    assert [k.state(utcnow()) for k in store.list_api_keys()] == ["revoked"]
    kinds = [(e.kind, e.actor) for e in store.events() if e.kind.startswith("api_key")]
    assert kinds == [("api_key_created", "ada"), ("api_key_revoked", "ada")]


def test_an_expired_key_gets_401(store):
    key = new_api_key()
    store.create_api_key("short", hash_api_key(key), utcnow() + timedelta(seconds=1), user="maria")
    assert status(store, key) == 200
    time.sleep(1.1)
    assert status(store, key) == 401
    assert store.list_api_keys()[0].state(utcnow()) == "expired"


def test_removing_a_user_ends_their_keys(store):
    key = new_api_key()
    store.create_api_key("laptop", hash_api_key(key), user="maria")
    store.remove_user("maria", by=store.principal("ada"))
    assert status(store, key) == 401
    assert store.principal_for_key(hash_api_key(key)) is None
    with pytest.raises(AfinaError) as raised:
        store.principal("maria")
    assert raised.value.code == "user_not_found"
    with pytest.raises(AfinaError) as raised:
        store.remove_user("ada")
    assert raised.value.code == "last_admin"


@pytest.mark.parametrize("text,expected", [("90m", timedelta(minutes=90)), ("12h", timedelta(hours=12)),
                                           ("30d", timedelta(days=30)), ("2w", timedelta(weeks=2))])
def test_expiry_is_written_as_a_span(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["30", "0d", "-1d", "1y", "soon"])
def test_a_bad_span_is_one_clear_error(text):
    with pytest.raises(AfinaError) as raised:
        parse_duration(text)
    assert raised.value.code == "bad_duration"


def test_a_store_at_0003_upgrades_and_its_keys_keep_working(tmp_path):
    """A database from before users, with a key, a file and a job in it, upgrades without losing any."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection=connection), "0003")
        key = new_api_key()
        connection.execute(text("INSERT INTO api_keys (name, sha256, created_at) VALUES ('ci', :h, :t)"),
                           {"h": hash_api_key(key), "t": datetime.datetime(2026, 11, 1)})
        connection.execute(text("INSERT INTO files (id, purpose, filename, bytes, sha256, path, created_at, deleted) "
                                "VALUES ('file-1', 'fine-tune', 'd.jsonl', 3, :s, '/x', :t, 0)"),
                           {"s": "a" * 64, "t": datetime.datetime(2026, 11, 1)})
        connection.execute(text("INSERT INTO jobs (id, model, training_file, hyperparameters, afina_config, status, "
                                "attempts, created_at) VALUES ('ftjob-1', 'default', 'file-1', '{}', '{}', 'queued', "
                                "0, :t)"), {"t": datetime.datetime(2026, 11, 1)})
    engine.dispose()
    with open_store(url) as store:
        found, principal = store.principal_for_key(hash_api_key(key))
        assert found.name == "ci" and found.user is None and principal.role_in("default") == "admin"
        assert store.get_file("file-1", project="default").filename == "d.jsonl"
        assert store.get_job("ftjob-1", project="default").status == "queued"
        assert not store.has_users()
        client = TestClient(create_jobs_app(store, JobsSettings(workers=0)))
        answer = client.get("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200 and [j["id"] for j in answer.json()["data"]] == ["ftjob-1"]


# TLS


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
                   .not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def https_server(store, tmp_path):
    import uvicorn

    cert, key = self_signed(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn_config(create_jobs_app(store, JobsSettings(workers=0)), host="127.0.0.1", port=port,
                            tls_cert=cert, tls_key=key)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield port, cert, config
    server.should_exit = True
    thread.join(timeout=30)


def test_https_serves_with_tls_1_3_and_refuses_tls_1_1(https_server):
    port, cert, config = https_server
    assert config.ssl.minimum_version == ssl.TLSVersion.TLSv1_2
    trusting = ssl.create_default_context(cafile=str(cert))
    with urllib.request.urlopen(f"https://localhost:{port}/health", context=trusting, timeout=10) as answer:
        assert answer.status == 200
    with socket.create_connection(("127.0.0.1", port)) as raw, trusting.wrap_socket(raw, server_hostname="localhost") \
            as tls:
        assert tls.version() == "TLSv1.3"
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that this client can offer TLS 1.1 at all
    old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", port)) as raw, pytest.raises(ssl.SSLError) as refused:
        old.wrap_socket(raw, server_hostname="localhost")
    # the server hangs up on the TLS 1.1 hello, or answers with a protocol_version alert
    assert isinstance(refused.value, ssl.SSLEOFError) or "protocol version" in str(refused.value).lower()


def test_plain_http_to_an_https_server_gets_no_answer(https_server):
    port, _, _ = https_server
    with pytest.raises((OSError, http.client.HTTPException)):  # a reset, or a reply that is not HTTP
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)


def test_a_certificate_that_does_not_load_is_one_clear_error(tmp_path):
    cert, _ = self_signed(tmp_path)
    result = CliRunner().invoke(cli, ["server", "--tls-cert", str(cert), "--tls-key", str(cert)])
    assert result.exit_code == 2 and "error[tls_invalid]" in result.output
