"""What the inference service counts, in Prometheus' text format (`GET /metrics`), and its request log.

    metrics = ServeMetrics()
    metrics.finished(RequestRecord(route="chat", model="default", status=200, ...))
    metrics.render(engine, running_requests=3)   # the text a Prometheus server scrapes

Counters and histograms are kept here; gauges (queue depth, batch size, running requests, prefix
cache) are read from the engine at each scrape, so they are never stale. The request log is one JSON
line per request on the `afina.requests` logger: who (the API key's id where one authenticated the
request, else the client's address), when, route, model, status, token counts, latency, time to first
token, redactions and whether the client went away. Prompts and outputs are never in it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field

REQUEST_LOG = logging.getLogger("afina.requests")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class RequestRecord:
    """One finished request, as counted and logged."""

    route: str  # chat | completions
    model: str
    status: int
    who: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None  # time to the first generated text
    redactions: dict[str, int] = field(default_factory=dict)  # type -> count
    disconnected: bool = False  # the client went away before the answer ended
    at: float = field(default_factory=time.time)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus histograms are exposed."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        rows = [f'{name}_bucket{{le="{bound:g}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        return rows + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                       f"{name}_count {self.count}"]


class ServeMetrics:
    """The service's counters and histograms; `finished` is called once per request."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.disconnects = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.redactions: dict[str, int] = {}
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.time_per_output_token = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.latency = Histogram(LATENCY_BUCKETS)
        self.started = time.monotonic()

    def finished(self, record: RequestRecord) -> None:
        with self.lock:
            key = (record.route, record.model, record.status)
            self.requests[key] = self.requests.get(key, 0) + 1
            self.disconnects += record.disconnected
            self.prompt_tokens += record.prompt_tokens
            self.completion_tokens += record.completion_tokens
            for kind, count in record.redactions.items():
                self.redactions[kind] = self.redactions.get(kind, 0) + count
            self.latency.observe(record.latency_s)
            if record.ttft_s is not None:
                self.ttft.observe(record.ttft_s)
                if record.completion_tokens > 1:
                    self.time_per_output_token.observe((record.latency_s - record.ttft_s)
                                                       / (record.completion_tokens - 1))
        REQUEST_LOG.info(json.dumps(asdict(record) | {"latency_s": round(record.latency_s, 4),
                                                     "ttft_s": None if record.ttft_s is None
                                                     else round(record.ttft_s, 4)}))

    def render(self, engine, running_requests: int) -> str:
        """The Prometheus text exposition of every metric."""
        with self.lock:
            out = describe("afina_requests_total", "counter", "Requests answered, by route, model and status")
            out += [f'afina_requests_total{{route="{route}",model="{label(model)}",status="{status}"}} {count}'
                    for (route, model, status), count in sorted(self.requests.items())]
            out += describe("afina_client_disconnects_total", "counter",
                            "Requests whose client went away before the answer ended (their rows freed)")
            out += [f"afina_client_disconnects_total {self.disconnects}"]
            out += describe("afina_prompt_tokens_total", "counter", "Prompt tokens of answered requests")
            out += [f"afina_prompt_tokens_total {self.prompt_tokens}"]
            out += describe("afina_output_tokens_total", "counter",
                            "Generated tokens (rate() of it is output tokens per second)")
            out += [f"afina_output_tokens_total {self.completion_tokens}"]
            out += describe("afina_redactions_total", "counter", "Personal data values redacted from outputs")
            out += [f'afina_redactions_total{{type="{kind}"}} {count}' for kind, count in sorted(self.redactions.items())]
            out += describe("afina_time_to_first_token_seconds", "histogram", "From request to first output text")
            out += self.ttft.lines("afina_time_to_first_token_seconds")
            out += describe("afina_time_per_output_token_seconds", "histogram", "Between output tokens, per request")
            out += self.time_per_output_token.lines("afina_time_per_output_token_seconds")
            out += describe("afina_request_duration_seconds", "histogram", "From request to its last byte")
            out += self.latency.lines("afina_request_duration_seconds")
            elapsed = max(time.monotonic() - self.started, 1e-9)
            out += describe("afina_output_tokens_per_second", "gauge", "Generated tokens per second since start")
            out += [f"afina_output_tokens_per_second {self.completion_tokens / elapsed:.3f}"]
        out += describe("afina_running_requests", "gauge", "Requests being answered (the concurrency cap's count)")
        out += [f"afina_running_requests {running_requests}"]
        out += describe("afina_queue_depth", "gauge", "Requests waiting for the engine to admit them")
        out += [f"afina_queue_depth {engine.queued_requests()}"]
        out += describe("afina_batch_size", "gauge", "Sequences the engine decodes together now")
        out += [f"afina_batch_size {engine.running_sequences()}"]
        cache = engine.prefix_cache
        out += describe("afina_prefix_cache_hits_total", "counter", "Prompts that reused a cached prefix")
        out += [f"afina_prefix_cache_hits_total {cache.hits}"]
        out += describe("afina_prefix_cache_reused_tokens_total", "counter", "Prompt tokens not computed again")
        out += [f"afina_prefix_cache_reused_tokens_total {cache.reused_tokens}"]
        return "\n".join(out) + "\n"


def describe(name: str, kind: str, text: str) -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]


def label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
