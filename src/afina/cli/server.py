"""`afina server` and `afina worker`: the OpenAI-compatible fine-tuning service and its workers."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated

import typer

from afina.cli.console import console

TLS_CERT_HELP = "PEM certificate: serve HTTPS (TLS 1.2 at least, 1.3 when the client has it)"
TLS_KEY_HELP = "PEM private key of --tls-cert (when the certificate file does not hold it)"
TlsCert = Annotated[Path | None, typer.Option("--tls-cert", help=TLS_CERT_HELP)]
TlsKey = Annotated[Path | None, typer.Option("--tls-key", help=TLS_KEY_HELP)]


def server_command(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)"),
    port: int = typer.Option(8000, "--port", help="Port to listen on"),
    workers: int = typer.Option(0, "--workers", help="Workers run in this process (0: run `afina worker` elsewhere)"),
    max_upload_mb: int = typer.Option(256, "--max-upload-mb", help="Largest file upload in MiB; larger ones get 413"),
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
) -> None:
    """Serve /v1/files and /v1/fine_tuning/jobs (OpenAI's fine-tuning API) on the store of AFINA_DATABASE_URL."""
    from afina.service.jobs_api import JobsSettings, create_jobs_app
    from afina.service.tls import check_tls_files, scheme, serve_app
    from afina.store import open_store

    if tls_cert is not None:
        check_tls_files(tls_cert, tls_key)  # before the store is opened or anything listens
    store = open_store()
    settings = JobsSettings(max_upload_bytes=max_upload_mb * 2**20, workers=workers)
    console.print(f"fine-tuning API at {scheme(tls_cert)}://{host}:{port}/v1 on {store.url}, {workers} local "
                  "workers; keys: afina keys create NAME", markup=False, highlight=False)
    try:
        serve_app(create_jobs_app(store, settings), host=host, port=port, tls_cert=tls_cert, tls_key=tls_key)
    finally:
        store.close()


def worker_command(
    max_jobs: int = typer.Option(None, "--max-jobs", help="Stop after this many jobs (default: run until stopped)"),
    lease: float = typer.Option(60.0, "--lease", help="Seconds a job stays this worker's without a heartbeat"),
    poll: float = typer.Option(2.0, "--poll", help="Seconds between looks for a queued job when idle"),
) -> None:
    """Claim queued fine-tuning jobs from the store and run them, one at a time, until stopped."""
    from afina.jobs.worker import Worker
    from afina.store import open_store

    with open_store() as store:
        worker = Worker(store, lease_seconds=lease, poll_seconds=poll, console=console)
        console.print(f"worker {worker.name} on {store.url}: waiting for jobs", markup=False, highlight=False)
        try:
            worker.run_forever(threading.Event(), max_jobs)
        except KeyboardInterrupt:
            console.print("stopped; an unfinished job was queued again for another worker")
            raise typer.Exit(130) from None
    console.print(f"worker {worker.name}: {worker.jobs_run} jobs run")
