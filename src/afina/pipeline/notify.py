"""Tell someone how a run ended: a signed webhook and an e-mail.

A notification that cannot be delivered must never fail the run or lose the model: `notify`
returns one DeliveryResult per channel and never raises; the caller records the failures as
warning events. Secrets come from the environment variables the config names.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.message import EmailMessage

import afina
from afina.config.gate import EmailConfig, NotifyConfig, WebhookConfig

SIGNATURE_HEADER = "X-Afina-Signature"
RETRIED_CODES = (408, 429)  # request timeout, too many requests: worth another try, like a 5xx


@dataclass(frozen=True)
class Notification:
    """What a run's outcome says: which run, the decision, the figures base vs tuned, why, and where
    the model is (None once discarded)."""

    run_id: str
    decision: str  # "registered", "discarded", "failed", ...
    figures: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> (base, tuned); gate's first
    reasons: list[str] = field(default_factory=list)
    model: str | None = None

    def subject(self) -> str:
        return f"afina run {self.run_id}: {self.decision}"

    def text(self) -> str:
        lines = [self.subject(), ""]
        if self.figures:
            width = max(len(metric) for metric in self.figures)
            lines += ["base vs tuned:"] + [f"  {metric:<{width}}  {base:.4f} -> {tuned:.4f} ({tuned - base:+.4f})"
                                           for metric, (base, tuned) in self.figures.items()] + [""]
        if self.reasons:
            lines += ["why:"] + [f"  - {reason}" for reason in self.reasons] + [""]
        lines.append(f"model: {self.model}" if self.model else "model: none kept")
        return "\n".join(lines) + "\n"

    def json(self) -> str:
        return json.dumps({"run_id": self.run_id, "decision": self.decision,
                           "figures": {metric: {"base": base, "tuned": tuned}
                                       for metric, (base, tuned) in self.figures.items()},
                           "reasons": self.reasons, "model": self.model, "afina_version": afina.__version__},
                          ensure_ascii=False)


@dataclass(frozen=True)
class DeliveryResult:
    channel: str  # "webhook" or "email"
    ok: bool
    attempts: int
    error: str | None = None


def notify(config: NotifyConfig, message: Notification) -> list[DeliveryResult]:
    """Deliver `message` on every configured channel; failures are results, never exceptions."""
    results = []
    if config.webhook is not None:
        results.append(guarded("webhook", lambda: post_webhook(config.webhook, message)))
    if config.email is not None:
        results.append(guarded("email", lambda: send_email(config.email, message)))
    return results


def guarded(channel: str, deliver) -> DeliveryResult:
    try:
        return deliver()
    except Exception as exc:  # an undelivered notification must not fail the run
        return DeliveryResult(channel, False, 1, f"{type(exc).__name__}: {exc}")


def sign(body: bytes, secret: str) -> str:
    """The signature header's value: sha256=<hex HMAC-SHA256 of the body under the secret>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post_webhook(config: WebhookConfig, message: Notification) -> DeliveryResult:
    """POST the JSON body; retry connection errors, timeouts and 5xx answers with doubling waits."""
    body = message.json().encode()
    headers = {"Content-Type": "application/json", "User-Agent": f"afina/{afina.__version__}"}
    secret = os.environ.get(config.secret_env) if config.secret_env else None
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    error = None
    for attempt in range(1, config.retries + 2):
        if attempt > 1:
            time.sleep(config.backoff_seconds * 2 ** (attempt - 2))
        request = urllib.request.Request(config.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=config.timeout_seconds):
                return DeliveryResult("webhook", True, attempt)  # urlopen raises on anything but 2xx
        except urllib.error.HTTPError as exc:
            exc.close()
            error = f"HTTP {exc.code} from {config.url}"
            if exc.code < 500 and exc.code not in RETRIED_CODES:  # refused: sending it again will not help
                return DeliveryResult("webhook", False, attempt, error)
        except (urllib.error.URLError, OSError) as exc:  # refused, unresolvable, timed out
            error = f"{config.url}: {getattr(exc, 'reason', exc)}"
    return DeliveryResult("webhook", False, config.retries + 1, error)


def send_email(config: EmailConfig, message: Notification) -> DeliveryResult:
    """Send the text over SMTP, upgraded with STARTTLS when configured, logged in when configured."""
    credentials = None
    if config.username_env:
        missing = [name for name in (config.username_env, config.password_env) if not os.environ.get(name)]
        if missing:
            return DeliveryResult("email", False, 0, f"environment variable {', '.join(missing)} is not set")
        credentials = os.environ[config.username_env], os.environ[config.password_env]
    mail = EmailMessage()
    mail["Subject"], mail["From"], mail["To"] = message.subject(), config.from_, ", ".join(config.to)
    mail.set_content(message.text())
    with smtplib.SMTP(config.host, config.port, timeout=config.timeout_seconds) as smtp:
        if config.starttls:
            smtp.starttls(context=ssl.create_default_context())
        if credentials:
            smtp.login(*credentials)
        smtp.send_message(mail)
    return DeliveryResult("email", True, 1)
