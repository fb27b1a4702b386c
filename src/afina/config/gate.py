"""The `gate:` and `notify:` sections of a run config: when a tuned model is kept, and who hears of it.

    gate:
      metric: exact_match            # or field:priority, billing/rouge_l (a task's metric), loss, ...
      min_improvement: 0.05          # tuned must beat base by this much, in the metric's better direction
      guards: [{metric: rouge_l, max_decrease: 0.02}]
    notify:
      webhook: {url: https://hooks.example.com/afina, secret_env: AFINA_WEBHOOK_SECRET}
      email: {host: smtp.example.com, from: afina@example.com, to: [ml-team@example.com],
              username_env: SMTP_USER, password_env: SMTP_PASSWORD}

Secrets and credentials are named by environment variable, never written in the config: configs
are stored with the run and shown in the registry.
"""

from __future__ import annotations

import re

from pydantic import ConfigDict, Field, field_validator, model_validator

from afina.config.methods import Strict

# The metrics the evaluation reports for both the base and the tuned model, and whether higher is
# better. Metrics measured only on the tuned model against its base (reward_accuracy, reward_margin,
# completion_reward_accuracy, score_margin) have no base value to beat and cannot gate.
GATE_METRICS: dict[str, bool] = {
    "exact_match": True,
    "json_valid": True,
    "field_accuracy_mean": True,
    "rouge_l": True,
    "preference_accuracy": True,
    "logp_margin": True,
    "loss": False,
    "perplexity": False,
}
FIELD_PREFIX = "field:"  # field:<key>, the accuracy of one JSON field (as in the comparison table)
TASK_SEPARATOR = "/"  # <task>/<metric>, one task's metric in a mixture of datasets

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


def metric_base_name(metric: str) -> str:
    """The metric without its task: `billing/field:team` -> `field:team`."""
    return metric.rpartition(TASK_SEPARATOR)[2]


def higher_is_better(metric: str) -> bool:
    """False for losses (any name ending in `loss`) and perplexity, True for everything else."""
    name = metric_base_name(metric)
    return not (name.endswith("loss") or name == "perplexity")


def gate_metric_names() -> list[str]:
    """The metric names a gate accepts, as shown to users."""
    return [*GATE_METRICS, f"{FIELD_PREFIX}<field>", f"<task>{TASK_SEPARATOR}<metric>"]


def check_metric_name(metric: str) -> str:
    """`metric` if it names something the evaluation reports for base and tuned; else ValueError."""
    task, _, name = metric.rpartition(TASK_SEPARATOR)
    known = name in GATE_METRICS or (name.startswith(FIELD_PREFIX) and len(name) > len(FIELD_PREFIX))
    if not known or (TASK_SEPARATOR in metric and not re.fullmatch(r"[A-Za-z0-9_-]+", task)):
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(gate_metric_names())}")
    return metric


class GuardConfig(Strict):
    metric: str = Field(description="A metric that may not get worse; same names as gate.metric.")
    max_decrease: float = Field(0.0, ge=0, description="How much worse the tuned model may be on it, in the "
                                                       "metric's own units (a rise, for a loss).")

    _known_metric = field_validator("metric")(check_metric_name)


class GateConfig(Strict):
    metric: str = Field("exact_match", description="The metric tuned must beat base on, over the same test rows: "
                                                   f"{', '.join(gate_metric_names())}. Losses and perplexity "
                                                   "are better lower.")
    min_improvement: float = Field(0.0, ge=0, description="Margin by which tuned must beat base, in the metric's "
                                                          "units (0.05 = five points of exact match; a drop, "
                                                          "for a loss).")
    require_significant: bool = Field(True, description="Also require the improvement not to be noise: its paired "
                                                        "confidence interval over the test rows (McNemar's test "
                                                        "for 0/1 metrics) must exclude zero.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Confidence level of the interval and the test.")
    bootstrap_samples: int = Field(2000, ge=100, le=100_000, description="Resamples of the paired bootstrap.")
    seed: int = Field(0, description="Seed of the bootstrap; the same seed gives the same interval.")
    guards: list[GuardConfig] = Field(default_factory=list, description="Other metrics that may not get worse by "
                                                                        "more than their tolerance.")
    general_data: str | None = Field(None, description="A general-purpose data file, relative to the config file, "
                                                       "whose loss checks that tuning did not forget general skills.")
    max_general_loss_increase: float | None = Field(
        None, ge=0, description="How much the loss on general_data may rise (nats per token) before the tuned "
                                "model is discarded.")

    _known_metric = field_validator("metric")(check_metric_name)

    @model_validator(mode="after")
    def _general_check_is_complete(self) -> "GateConfig":
        if (self.general_data is None) != (self.max_general_loss_increase is None):
            raise ValueError("give gate.general_data and gate.max_general_loss_increase together")
        return self


class WebhookConfig(Strict):
    url: str = Field(pattern=r"^https?://", description="Where the run's outcome is POSTed as JSON.")
    secret_env: str | None = Field(None, pattern=ENV_NAME,
                                   description="Environment variable holding the signing secret; the body is signed "
                                               "with HMAC-SHA256 in the X-Afina-Signature header (sha256=<hex>).")
    timeout_seconds: float = Field(10.0, gt=0, description="Time allowed for each attempt.")
    retries: int = Field(3, ge=0, le=10, description="Further attempts after a connection error or a 5xx answer.")
    backoff_seconds: float = Field(1.0, ge=0, description="Wait before the first retry; doubled before each next one.")


class EmailConfig(Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    host: str = Field(description="SMTP server.")
    port: int = Field(587, ge=1, le=65535, description="SMTP port (587 is the submission port, with STARTTLS).")
    starttls: bool = Field(True, description="Upgrade the connection with STARTTLS before logging in or sending.")
    from_: str = Field(alias="from", description="Sender address.")
    to: list[str] = Field(min_length=1, description="Recipient addresses.")
    username_env: str | None = Field(None, pattern=ENV_NAME, description="Environment variable holding the SMTP "
                                                                         "user name; without it, no login.")
    password_env: str | None = Field(None, pattern=ENV_NAME,
                                     description="Environment variable holding the SMTP password.")
    timeout_seconds: float = Field(10.0, gt=0, description="Time allowed for the SMTP conversation.")

    @model_validator(mode="after")
    def _login_needs_both(self) -> "EmailConfig":
        if (self.username_env is None) != (self.password_env is None):
            raise ValueError("give username_env and password_env together")
        return self


class NotifyConfig(Strict):
    webhook: WebhookConfig | None = Field(None, description="POST the outcome of each run to a URL.")
    email: EmailConfig | None = Field(None, description="Mail the outcome of each run.")
