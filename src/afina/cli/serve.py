"""`afina serve`: an OpenAI-compatible server for the base model and any number of tuned models."""

from __future__ import annotations

import typer

from afina.cli.console import console
from afina.cli.server import TlsCert, TlsKey
from afina.cli.users import UserOption, acting_principal, open_user_store
from afina.errors import AfinaError
from afina.store.principals import DEFAULT_PROJECT

LOOPBACK = ("127.0.0.1", "localhost", "::1")
ENGINES = ("transformers", "llama.cpp")


def serve_command(
    models: list[str] = typer.Argument(None, help="Models to serve: `default`, a registry name or alias "  # noqa: B008
                                                  "(demo:production), a run directory, a merged model directory or "
                                                  "a GGUF file. Default: default"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, "--port", help="Port to listen on"),
    max_concurrent: int = typer.Option(64, "--max-concurrent", help="Requests served at once; more get 429"),
    max_request_tokens: int = typer.Option(None, "--max-request-tokens",
                                           help="Prompt + max_tokens per request (default: the model's context)"),
    max_batch_size: int = typer.Option(32, "--max-batch-size", help="Sequences decoded together in one step"),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds a request may run before it is ended"),
    engine: str = typer.Option("transformers", "--engine",
                               help="transformers (batching, adapters, any MODEL) or llama.cpp (GGUF files, "
                                    "needs llama-cpp-python)"),
    prefix_cache_tokens: int = typer.Option(8192, "--prefix-cache-tokens",
                                            help="Prompt tokens whose KV cache is kept for reuse by prompts that "
                                                 "start the same way (a shared system prompt); 0: none"),
    redact_output: bool = typer.Option(False, "--redact-output",
                                       help="Replace personal data in outputs (e-mail, IBAN, phone, IDs, ...) with "
                                            "typed placeholders, streams included"),
    sanitize_output: bool = typer.Option(False, "--sanitize-output",
                                         help="Remove markup, markdown images and control characters from outputs"),
    request_log: str = typer.Option(None, "--request-log",
                                    help="Append one JSON line per request (who, when, model, tokens, latency; no "
                                         "prompts or outputs) to this file; - for stderr"),
    project: str = typer.Option(DEFAULT_PROJECT, "--project",
                                help="Whose models these are: a key's user needs a role in this project"),
    no_auth: bool = typer.Option(False, "--no-auth", help="Serve without API keys (loopback addresses only)"),
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    user: UserOption = None,
) -> None:
    """Serve models on /v1/chat/completions, /v1/completions and /v1/models (OpenAI's API). Every /v1
    request needs an API key whose user may use models in --project (`afina keys create`)."""
    from afina.pipeline.prepare import quiet_libraries
    from afina.service.tls import check_tls_files, scheme, serve_app

    if no_auth and host not in LOOPBACK:
        raise AfinaError("auth_required", f"--no-auth serves anyone who reaches {host}", location="--no-auth",
                         hint="keep API keys on, or listen on 127.0.0.1 only")
    if tls_cert is not None:
        check_tls_files(tls_cert, tls_key)
    store = None if no_auth else open_user_store()
    if store is not None:  # the operator starting the server may use the models they serve
        store.check_permission(acting_principal(store, user), "use_model", project)
    from afina.service.app import ServeSettings, create_app
    from afina.serving.engine import Engine
    from afina.serving.llama_cpp_engine import LlamaCppEngine, load_gguf_models
    from afina.serving.loading import load_served_models, resolve_source

    if engine not in ENGINES:
        raise AfinaError("bad_option", f"unknown engine {engine!r}", location="--engine", hint=" or ".join(ENGINES))
    quiet_libraries()
    sources = [resolve_source(name) for name in (models or ["default"])]  # every name checked before loading
    with console.status("loading models"):
        if engine == "llama.cpp":
            runner = LlamaCppEngine(load_gguf_models(sources))
        else:
            runner = Engine(load_served_models(sources), max_batch_size=max_batch_size,
                            prefix_cache_tokens=prefix_cache_tokens)
    for source in sources:
        adapter = f" (adapter {source.adapter_dir})" if source.adapter_dir else ""
        console.print(f"serving {source.name}: {source.base}{adapter}", markup=False, highlight=False)
    settings = ServeSettings(max_concurrent_requests=max_concurrent, max_request_tokens=max_request_tokens,
                             request_timeout_s=timeout, redact_output=redact_output, sanitize_output=sanitize_output)
    if request_log is not None:
        open_request_log(request_log)
    app = create_app(runner, settings, keys=store, project=project)
    keys = f"API keys of project {project}'s users" if store else "no API keys (--no-auth)"
    console.print(f"OpenAI-compatible API at {scheme(tls_cert)}://{host}:{port}/v1 (ready at /ready once warmed up); "
                  f"{keys}", markup=False, highlight=False)
    try:
        serve_app(app, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key)
    finally:
        if store is not None:
            store.close()


def open_request_log(path: str) -> None:
    """The request log's lines go to `path` (appended), or to stderr for `-`."""
    import logging

    from afina.serving.metrics import REQUEST_LOG

    handler = logging.StreamHandler() if path == "-" else logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    REQUEST_LOG.addHandler(handler)
    REQUEST_LOG.setLevel(logging.INFO)
    REQUEST_LOG.propagate = False
