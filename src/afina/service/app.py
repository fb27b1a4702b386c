"""The OpenAI-compatible inference service: /v1/models, /v1/chat/completions, /v1/completions.

    app = create_app(Engine(load_served_models(sources)), ServeSettings(max_concurrent_requests=32))
    uvicorn.run(app, host="127.0.0.1", port=8000)

`/health` answers as soon as the process runs; `/ready` turns true once every model has generated
a warm-up answer. Errors have OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400
for a bad parameter (named in `param`), 404 for a model not served, 413 for a body too large, 429
with Retry-After beyond the concurrent-request cap, 504 past the request timeout. `/ready` turns
false again while the server shuts down.

`/metrics` is the Prometheus text of `afina.serving.metrics`; every request also leaves one line in
the request log. A client that goes away mid-stream ends its request at once: its rows leave the
engine's batch at the next step and its slot is free; one waiting for a whole answer is noticed
within DISCONNECT_CHECK_S. On shutdown (SIGTERM, Ctrl-C) uvicorn stops
accepting connections and waits for the running requests to finish before the engine stops.

With `redact_output` every answer, whole or streamed, passes through an `OutputFilter`: personal
data becomes typed placeholders (counted in /metrics and the log) and, with `sanitize_output`,
markup and control characters are removed. Log-probabilities would show the removed tokens, so
such a server refuses `logprobs`.

With `keys` (a store; `afina serve` passes one unless `--no-auth`), every route but /health and
/ready needs
`Authorization: Bearer KEY`: 401 for a missing, unknown, expired or revoked key, 403
`permission_denied` when the key's user may not use models in the served `project`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from afina.errors import AfinaError
from afina.security.permissions import authorize
from afina.service.jobs_api import require_key
from afina.service.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    SamplingFields,
    parse_body,
)
from afina.serving.engine import (
    Delta,
    Engine,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
)
from afina.serving.metrics import RequestRecord, ServeMetrics
from afina.serving.output_filter import OutputFilter
from afina.store import Store
from afina.store.principals import DEFAULT_PROJECT


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the inference service."""

    max_concurrent_requests: int = 64  # beyond this, 429 with Retry-After
    max_request_tokens: int | None = None  # prompt + max_tokens per request; None: the model's context length
    default_max_tokens: int = 512  # when a request names none (less if the context is shorter)
    request_timeout_s: float = 300.0  # a request still running then is ended (504, or an error event)
    max_body_bytes: int = 4 * 2**20  # larger bodies get 413
    redact_output: bool = False  # personal data in outputs replaced by typed placeholders
    sanitize_output: bool = False  # markup and control characters removed from outputs


class Slots:
    """A counter of running requests with a cap; taking one beyond the cap fails at once."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self) -> None:
        if self.used >= self.limit:
            raise ApiError(429, f"the server is at its limit of {self.limit} concurrent requests; retry shortly",
                           type="rate_limit_error", code="too_many_requests", headers={"Retry-After": "1"})
        self.used += 1

    def give_back(self) -> None:
        self.used -= 1


def create_app(engine: Engine, settings: ServeSettings = ServeSettings(), keys: Store | None = None,
               project: str = DEFAULT_PROJECT) -> FastAPI:
    """The service around a (not yet started) engine: started, warmed up and stopped with the app;
    behind the API keys of `keys` when given, for users who may use models in `project` (the app
    hands `keys` its permission check, `afina.security.permissions.authorize`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        warm_up = asyncio.create_task(asyncio.to_thread(engine.warm_up))
        yield
        warm_up.cancel()
        await asyncio.to_thread(engine.stop)

    guard = [Depends(model_users(keys.check_permissions_with(authorize), project))] if keys is not None else []
    app = FastAPI(title="afina", lifespan=lifespan, dependencies=guard, docs_url=None, redoc_url=None,
                  openapi_url=None)
    slots = Slots(settings.max_concurrent_requests)
    metrics = ServeMetrics()
    app.state.metrics = metrics
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": engine.ready}, status_code=200 if engine.ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine, slots.used), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "afina"}
                                           for name in engine.models.names()]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        slots.take()  # first: an overloaded server refuses before it reads or tokenizes anything
        try:
            body = parse_body(ChatRequest, await read_body(request, settings))
            prompt_ids = chat_prompt_ids(served_model(engine, body.model).tokenizer, body)
            json_object = body.response_format is not None and body.response_format.type == "json_object"
            params = sampling_params(engine, body, len(prompt_ids), body.max_completion_tokens or body.max_tokens,
                                     json_object, settings, "messages")
        except BaseException:
            slots.give_back()
            raise
        return await respond(Serving(engine, slots, settings, metrics), request, body, prompt_ids, params, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        slots.take()
        try:
            body = parse_body(CompletionRequest, await read_body(request, settings))
            tokenizer = served_model(engine, body.model).tokenizer
            prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            if len(prompts) != 1:
                raise ApiError(400, "one prompt per request", param="prompt")
            if body.echo:
                raise ApiError(400, "echo is not supported", param="echo")
            prompt_ids = tokenizer(prompts[0])["input_ids"]
            params = sampling_params(engine, body, len(prompt_ids), body.max_tokens, False, settings, "prompt")
        except BaseException:
            slots.give_back()
            raise
        return await respond(Serving(engine, slots, settings, metrics), request, body, prompt_ids, params,
                             chat=False)

    return app


OPEN_PATHS = frozenset({"/health", "/ready"})


def model_users(store: Store, project: str):
    """A dependency of every route: a live API key whose user may use models in `project` (401,
    403); only /health and /ready stay open, for load balancers (/metrics needs a key too)."""

    def check(request: Request) -> None:
        if request.url.path in OPEN_PATHS:
            return
        principal = require_key(request, store)
        request.state.principal = principal  # the request log names the key's user
        try:
            store.check_permission(principal, "use_model", project)
        except AfinaError as error:
            raise ApiError(403, error.message, type="permission_error", code=error.code) from None

    return check


async def read_body(request: Request, settings: ServeSettings) -> object:
    if int(request.headers.get("content-length") or 0) > settings.max_body_bytes:
        raise ApiError(413, f"the request body is larger than {settings.max_body_bytes} bytes", code="body_too_large")
    raw = await request.body()
    if len(raw) > settings.max_body_bytes:
        raise ApiError(413, f"the request body is larger than {settings.max_body_bytes} bytes", code="body_too_large")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None


def chat_prompt_ids(tokenizer, body: ChatRequest) -> list[int]:
    """The conversation through the model's own chat template, ending where the assistant answers."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"{body.model} has no chat template; use /v1/completions", param="model")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def served_model(engine: Engine, name: str):
    if name not in engine.models.routes:
        raise ApiError(404, f"the model {name!r} does not exist here; served models: {', '.join(engine.models.names())}",
                       param="model", code="model_not_found")
    return engine.models.get(name)


def sampling_params(engine: Engine, body: SamplingFields, prompt_tokens: int, max_tokens: int | None,
                    json_object: bool, settings: ServeSettings, prompt_param: str) -> SamplingParams:
    """The engine's parameters for a request; ApiError 400 for what the request's lengths do not allow."""
    logprobs = body.logprobs_wanted()
    if logprobs is not None and (settings.redact_output or settings.sanitize_output):
        raise ApiError(400, "this server filters its outputs (--redact-output, --sanitize-output); log-probabilities "
                       "would show the tokens it removes, so they are not available", param="logprobs")
    context = engine.models.get(body.model).context_length
    limit = min(settings.max_request_tokens or context, context)
    if prompt_tokens >= limit:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens; this server takes at most {limit} tokens per "
                       "request (prompt + max_tokens)", param=prompt_param, code="context_length_exceeded")
    if max_tokens is not None and prompt_tokens + max_tokens > limit:
        raise ApiError(400, f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the limit "
                       f"of {limit} tokens per request", param="max_tokens", code="context_length_exceeded")
    max_tokens = max_tokens or min(settings.default_max_tokens, limit - prompt_tokens)
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                          stop=body.stops(), json_object=json_object, n=body.n, logprobs=logprobs)


@dataclass
class Serving:
    """What answering a request needs from the app."""

    engine: Engine
    slots: Slots
    settings: ServeSettings
    metrics: ServeMetrics


class Answer:
    """One request's run: its events, its choices' texts (cleaned when the server filters outputs), and
    what is counted and logged when it ends."""

    def __init__(self, serving: Serving, http: Request, body: SamplingFields, prompt_ids: list[int],
                 params: SamplingParams, chat: bool):
        loop = asyncio.get_running_loop()
        self.serving, self.params = serving, params
        self.events: asyncio.Queue = asyncio.Queue()
        self.request = GenerationRequest(body.model, prompt_ids, params,
                                         deliver=lambda event: loop.call_soon_threadsafe(self.events.put_nowait, event))
        self.shape = ResponseShape(body.model, chat, len(prompt_ids), serving.engine.models.get(body.model).tokenizer)
        settings = serving.settings
        self.filters = [OutputFilter(settings.redact_output, settings.sanitize_output)
                        if settings.redact_output or settings.sanitize_output else None for _ in range(params.n)]
        self.texts, self.reasons = [""] * params.n, [None] * params.n
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(params.n)]
        self.completion_tokens, self.first_text_at = 0, None
        self.record = RequestRecord(route="chat" if chat else "completions", model=body.model, status=200,
                                    who=who_asked(http), prompt_tokens=len(prompt_ids))

    async def next(self) -> tuple[int, str, list[TokenLogprob], str | None]:
        """The next event as (choice, new text, its tokens' log-probabilities, finish_reason or None)."""
        event = await self.events.get()
        cleaner = self.filters[event.index]
        if isinstance(event, Delta):
            text = cleaner.push(event.text) if cleaner else event.text
            self.logprobs[event.index] += event.logprobs
            finish_reason, logprobs = None, event.logprobs
        else:
            text = cleaner.flush() if cleaner else ""
            self.reasons[event.index] = finish_reason = event.finish_reason
            self.completion_tokens += event.completion_tokens
            logprobs = []
        if text and self.first_text_at is None:
            self.first_text_at = time.perf_counter()
        self.texts[event.index] += text
        return event.index, text, logprobs, finish_reason

    def end(self, status: int, disconnected: bool = False) -> None:
        """Give the slot back, free the engine's rows (a no-op once finished), count and log the request."""
        self.request.cancelled.set()
        self.serving.slots.give_back()
        record = self.record
        record.status, record.disconnected, record.completion_tokens = status, disconnected, self.completion_tokens
        record.latency_s = time.perf_counter() - self.request.submitted_at
        record.ttft_s = self.first_text_at - self.request.submitted_at if self.first_text_at else None
        for cleaner in filter(None, self.filters):
            for kind, count in cleaner.redactions.items():
                record.redactions[kind] = record.redactions.get(kind, 0) + count
        self.serving.metrics.finished(record)


def who_asked(http: Request) -> str:
    """The API key's user where authentication left its principal on the request (`request.state.
    principal`), else the client's address."""
    principal = getattr(http.state, "principal", None)
    if principal is not None:
        return f"user:{principal.user}"
    return f"ip:{http.client.host}" if http.client else "unknown"


async def respond(serving: Serving, http: Request, body: SamplingFields, prompt_ids: list[int],
                  params: SamplingParams, chat: bool):
    """Run the request (whose slot is taken) and answer it whole or as a stream; the slot is given back
    when it ends, however it ends."""
    answer = Answer(serving, http, body, prompt_ids, params, chat)
    try:
        serving.engine.submit(answer.request)
    except BaseException:
        serving.slots.give_back()
        raise
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return EventStream(stream(answer, include_usage), media_type="text/event-stream")
    timeout = serving.settings.request_timeout_s
    status = 499  # unless it ends otherwise: the client went away
    try:
        async with asyncio.timeout(timeout):
            if await collect(answer, http):
                status = 200
    except TimeoutError:
        status = 504
        raise ApiError(504, f"the request did not finish within {timeout:g} s", type="timeout",
                       code="timeout") from None
    finally:
        answer.end(status, disconnected=status == 499)
    if status == 499:
        return JSONResponse({"error": {"message": "the client went away", "type": "client_closed_request"}},
                            status_code=499)
    return answer.shape.complete(answer.texts, answer.reasons, answer.logprobs, answer.completion_tokens)


DISCONNECT_CHECK_S = 0.25  # how often a whole-answer request looks whether its client is still there


async def collect(answer: Answer, http: Request) -> bool:
    """Wait until every choice finished; False as soon as the client is found gone (its rows are then
    freed by `Answer.end`), looked at every DISCONNECT_CHECK_S, between tokens or without them."""
    checked = time.monotonic()
    while None in answer.reasons:
        try:
            await asyncio.wait_for(answer.next(), DISCONNECT_CHECK_S)  # an event waited for is never lost
        except TimeoutError:
            pass
        if time.monotonic() - checked >= DISCONNECT_CHECK_S:
            checked = time.monotonic()
            if await http.is_disconnected():
                return False
    return True


class EventStream(StreamingResponse):
    """A streaming response that closes its generator however the response ends, so that a request's
    rows and slot are freed at once also where the server reports a disconnect by failing a send."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


async def stream(answer: Answer, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per delta, a last chunk per choice with its finish_reason, usage
    when asked for, then `data: [DONE]`. Closed early (the client went away), it ends the request."""
    shape, n, timeout = answer.shape, answer.params.n, answer.serving.settings.request_timeout_s
    status, disconnected = 200, True
    try:
        if shape.chat:
            for index in range(n):
                yield sse(shape.chunk(index, {"role": "assistant", "content": ""}, None))
        try:
            async with asyncio.timeout(timeout):
                while None in answer.reasons:
                    index, text, logprobs, finish_reason = await answer.next()
                    if text or logprobs:
                        offset = len(answer.texts[index]) - len(text)  # where this text starts in the answer
                        yield sse(shape.chunk(index, {"content": text}, None, text=text, logprobs=logprobs,
                                              offset=offset))
                    if finish_reason:
                        yield sse(shape.chunk(index, {}, finish_reason))
        except TimeoutError:
            status = 504
            error = ApiError(504, f"the request did not finish within {timeout:g} s", type="timeout", code="timeout")
            yield sse(error.body())
        else:
            if include_usage:
                yield sse(shape.chunk(None, None, None) | {"usage": shape.usage(answer.completion_tokens)})
        yield "data: [DONE]\n\n"
        disconnected = False
    finally:
        answer.end(499 if disconnected else status, disconnected)


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


@dataclass
class ResponseShape:
    """Builds the OpenAI response objects of one request."""

    model: str
    chat: bool
    prompt_tokens: int
    tokenizer: object

    def __post_init__(self):
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def complete(self, texts: list[str], reasons: list[str], logprobs: list[list[TokenLogprob]],
                 completion_tokens: int) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                        "logprobs": self.logprobs(entries)}
                       for i, (text, reason, entries) in enumerate(zip(texts, reasons, logprobs))]
        else:
            choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": self.logprobs(entries)}
                       for i, (text, reason, entries) in enumerate(zip(texts, reasons, logprobs))]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage(completion_tokens)}

    def chunk(self, index: int | None, delta: dict | None, finish_reason: str | None, text: str = "",
              logprobs: list[TokenLogprob] | None = None, offset: int = 0) -> dict:
        if index is None:
            choices = []
        elif self.chat:
            choices = [{"index": index, "delta": delta, "finish_reason": finish_reason,
                        "logprobs": self.logprobs(logprobs)}]
        else:
            choices = [{"index": index, "text": text, "finish_reason": finish_reason,
                        "logprobs": self.logprobs(logprobs, offset)}]
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}

    def logprobs(self, entries: list[TokenLogprob] | None, offset: int = 0) -> dict | None:
        """OpenAI's logprobs object: chat's {"content": [{token, logprob, bytes, top_logprobs}]}, or the
        completions' {"tokens", "token_logprobs", "top_logprobs", "text_offset"} (offsets in the answer's
        text, whose part here starts at `offset`); None when not asked."""
        if not entries:
            return None
        if self.chat:
            return {"content": [self.token_entry(e.token, e.logprob)
                                | {"top_logprobs": [self.token_entry(t, lp) for t, lp in e.top]} for e in entries],
                    "refusal": None}
        tokens = [self.token_text(e.token) for e in entries]
        offsets = [offset + sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self.token_text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}

    def token_entry(self, token: int, logprob: float) -> dict:
        text = self.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])
