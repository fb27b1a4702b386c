import hashlib
import hmac
import json
import socket
import threading
import time
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from afina.config.gate import EmailConfig, NotifyConfig, WebhookConfig
from afina.pipeline.notify import Notification, notify

MESSAGE = Notification(run_id="run-20250101-abc", decision="discarded",
                       figures={"exact_match": (0.25, 0.27), "rouge_l": (0.61, 0.6)},
                       reasons=["improvement +0.020 is within noise (95% CI -0.030..+0.070 includes 0)"])


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """The test servers listen on 127.0.0.1: a proxy from the environment must not stand between."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Receiver:
    """A local webhook receiver answering with the listed status codes in turn (200 once they run out)."""

    def __init__(self, statuses: list[int]):
        self.statuses, self.requests = list(statuses), []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def start(statuses=()):
        made.append(Receiver(list(statuses)))
        return made[-1]

    yield start
    for server in made:
        server.close()


def test_webhook_is_signed_and_retried_after_a_500(receiver, monkeypatch):
    monkeypatch.setenv("HOOK_SECRET", "s3cret")
    server = receiver([500])
    config = NotifyConfig(webhook=WebhookConfig(url=server.url, secret_env="HOOK_SECRET", backoff_seconds=0.01))
    [result] = notify(config, MESSAGE)
    assert (result.channel, result.ok, result.attempts, result.error) == ("webhook", True, 2, None)
    assert len(server.requests) == 2
    headers, body = server.requests[-1]
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Afina-Signature"], expected)
    assert headers["Content-Type"] == "application/json"
    sent = json.loads(body)
    assert (sent["run_id"], sent["decision"]) == ("run-20250101-abc", "discarded")
    assert sent["figures"]["exact_match"] == {"base": 0.25, "tuned": 0.27}
    assert sent["reasons"] == MESSAGE.reasons and sent["model"] is None


def test_webhook_without_its_secret_is_sent_unsigned(receiver, monkeypatch):
    monkeypatch.delenv("HOOK_SECRET", raising=False)
    server = receiver()
    [result] = notify(NotifyConfig(webhook=WebhookConfig(url=server.url, secret_env="HOOK_SECRET")), MESSAGE)
    assert result.ok
    assert "X-Afina-Signature" not in server.requests[0][0]


def test_webhook_gives_up_after_its_retries_and_not_on_a_refusal(receiver):
    server = receiver([503, 503, 503])
    [result] = notify(NotifyConfig(webhook=WebhookConfig(url=server.url, retries=2, backoff_seconds=0.01)), MESSAGE)
    assert (result.ok, result.attempts) == (False, 3)
    assert result.error == f"HTTP 503 from {server.url}"
    refused = receiver([403])
    [result] = notify(NotifyConfig(webhook=WebhookConfig(url=refused.url, backoff_seconds=0.01)), MESSAGE)
    assert (result.ok, result.attempts, len(refused.requests)) == (False, 1, 1)


def test_unreachable_webhook_fails_quickly_without_raising():
    config = WebhookConfig(url=f"http://127.0.0.1:{free_port()}/hook", retries=2, backoff_seconds=0.01,
                           timeout_seconds=2)
    start = time.monotonic()
    [result] = notify(NotifyConfig(webhook=config), MESSAGE)
    assert time.monotonic() - start < 2
    assert (result.ok, result.attempts) == (False, 3)
    assert "refused" in result.error.lower()


class Mailbox:
    def __init__(self):
        self.envelopes, self.logins = [], []

    async def handle_DATA(self, server, session, envelope):
        self.envelopes.append(envelope)
        return "250 OK"

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        self.logins.append((auth_data.login.decode(), auth_data.password.decode()))
        return AuthResult(success=True)


@pytest.fixture
def smtp_server():
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(), authenticator=mailbox.authenticate,
                            auth_require_tls=False)
    controller.start()
    yield mailbox, controller.port
    controller.stop()


def email_config(port: int, **overrides) -> EmailConfig:
    return EmailConfig.model_validate({"host": "127.0.0.1", "port": port, "starttls": False,
                                       "from": "afina@example.com", "to": ["ml-team@example.com", "lead@example.com"],
                                       "timeout_seconds": 5, **overrides})


def test_email_reaches_the_smtp_server_with_credentials_from_the_environment(smtp_server, monkeypatch):
    mailbox, port = smtp_server
    monkeypatch.setenv("SMTP_USER", "afina-bot")
    monkeypatch.setenv("SMTP_PASSWORD", "pw")
    config = email_config(port, username_env="SMTP_USER", password_env="SMTP_PASSWORD")
    [result] = notify(NotifyConfig(email=config), MESSAGE)
    assert (result.channel, result.ok) == ("email", True)
    assert mailbox.logins == [("afina-bot", "pw")]
    [envelope] = mailbox.envelopes
    assert envelope.mail_from == "afina@example.com"
    assert envelope.rcpt_tos == ["ml-team@example.com", "lead@example.com"]
    mail = message_from_bytes(envelope.content)
    assert mail["Subject"] == "afina run run-20250101-abc: discarded"
    text = mail.get_payload(decode=True).decode()
    assert "exact_match  0.2500 -> 0.2700 (+0.0200)" in text
    assert "within noise" in text and "model: none kept" in text


def test_email_without_its_credentials_or_server_fails_without_raising(smtp_server, monkeypatch):
    mailbox, port = smtp_server
    monkeypatch.delenv("SMTP_USER", raising=False)
    monkeypatch.setenv("SMTP_PASSWORD", "pw")
    config = email_config(port, username_env="SMTP_USER", password_env="SMTP_PASSWORD")
    [result] = notify(NotifyConfig(email=config), MESSAGE)
    assert not result.ok and result.error == "environment variable SMTP_USER is not set"
    assert mailbox.envelopes == []
    [result] = notify(NotifyConfig(email=email_config(free_port())), MESSAGE)
    assert not result.ok and "refused" in result.error.lower()


def test_both_channels_report_on_their_own(receiver):
    server = receiver()
    config = NotifyConfig(webhook=WebhookConfig(url=server.url), email=email_config(free_port()))
    webhook, email = notify(config, Notification(run_id="r1", decision="registered", model="/runs/r1/adapter"))
    assert webhook.ok and not email.ok
    assert json.loads(server.requests[0][1])["model"] == "/runs/r1/adapter"
