"""`afina serve`: an OpenAI-compatible server for the base model and any number of tuned models."""

from __future__ import annotations

import typer

from afina.cli.console import console


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
) -> None:
    """Serve models on /v1/chat/completions, /v1/completions and /v1/models (OpenAI's API)."""
    import uvicorn

    from afina.pipeline.prepare import quiet_libraries
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
    app = create_app(Engine(served, max_batch_size=max_batch_size), settings)
    console.print(f"OpenAI-compatible API at http://{host}:{port}/v1 (ready at /ready once warmed up)",
                  markup=False, highlight=False)
    uvicorn.run(app, host=host, port=port, log_level="warning")
