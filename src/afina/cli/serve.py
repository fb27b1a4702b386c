"""`afina serve`: an OpenAI-compatible server for the base model and any number of tuned models."""

from __future__ import annotations

import typer

from afina.cli.console import console
from afina.cli.server import TlsCert, TlsKey
from afina.cli.users import UserOption, acting_principal
from afina.errors import AfinaError
from afina.security.permissions import DEFAULT_PROJECT

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_command(
    models: list[str] = typer.Argument(None, help="Models to serve: `default`, a registry name or alias "
                                                  "(demo:production), a run directory or a merged model directory. "
                                                  "Default: default"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, "--port", help="Port to listen on"),
    max_concurrent: int = typer.Option(64, "--max-concurrent", help="Requests served at once; more get 429"),
    max_request_tokens: int = typer.Option(None, "--max-request-tokens",
                                           help="Prompt + max_tokens per request (default: the model's context)"),
    max_batch_size: int = typer.Option(32, "--max-batch-size", help="Sequences decoded together in one step"),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds a request may run before it is ended"),
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
    from afina.store import open_store

    if no_auth and host not in LOOPBACK:
        raise AfinaError("auth_required", f"--no-auth serves anyone who reaches {host}", location="--no-auth",
                         hint="keep API keys on, or listen on 127.0.0.1 only")
    if tls_cert is not None:
        check_tls_files(tls_cert, tls_key)
    store = None if no_auth else open_store()
    if store is not None:  # the operator starting the server may use the models they serve
        store.check_permission(acting_principal(store, user), "use_model", project)
    from afina.service.app import ServeSettings, create_app
    from afina.serving.engine import Engine
    from afina.serving.loading import load_served_models, resolve_source

    quiet_libraries()
    sources = [resolve_source(name) for name in (models or ["default"])]  # every name checked before loading
    with console.status("loading models"):
        served = load_served_models(sources)
    for source in sources:
        adapter = f" (adapter {source.adapter_dir})" if source.adapter_dir else ""
        console.print(f"serving {source.name}: {source.base}{adapter}", markup=False, highlight=False)
    settings = ServeSettings(max_concurrent_requests=max_concurrent, max_request_tokens=max_request_tokens,
                             request_timeout_s=timeout)
    app = create_app(Engine(served, max_batch_size=max_batch_size), settings, keys=store, project=project)
    keys = f"API keys of project {project}'s users" if store else "no API keys (--no-auth)"
    console.print(f"OpenAI-compatible API at {scheme(tls_cert)}://{host}:{port}/v1 (ready at /ready once warmed up); "
                  f"{keys}", markup=False, highlight=False)
    try:
        serve_app(app, host=host, port=port, tls_cert=tls_cert, tls_key=tls_key)
    finally:
        if store is not None:
            store.close()
