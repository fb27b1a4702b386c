"""`afina models ...` and `afina runs ...`: the registry of model versions and the record of attempts."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from afina.cli.console import console, user_errors

models_app = typer.Typer(help="Registered model versions: list, show, promote an alias, delete.",
                         no_args_is_help=True)
runs_app = typer.Typer(help="Every attempt of `afina run`: its stages, decision and figures.", no_args_is_help=True)


def _store():
    from afina.store import open_store

    return open_store()


@models_app.command("list")
@user_errors
def models_list(name: str = typer.Argument(None, help="Only this model name"),
                deleted: bool = typer.Option(False, "--deleted", help="Include deleted versions")) -> None:
    """Model versions, newest first, with their aliases and headline figures."""
    with _store() as store:
        models = store.list_models(name, include_deleted=deleted)
    table = Table(title="models")
    for column in ("model", "aliases", "status", "run", "gate", "created"):
        table.add_column(column)
    for m in models:
        gate = m.gate or {}
        figures = (f"{gate.get('metric')} {gate.get('base_value', 0):.3f} -> {gate.get('tuned_value', 0):.3f}"
                   if gate.get("metric") else "")
        table.add_row(f"{m.name}:{m.version}", ", ".join(m.aliases), m.status, m.run_id, figures,
                      m.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


@models_app.command("show")
@user_errors
def models_show(ref: str = typer.Argument(..., help="NAME, NAME:VERSION or NAME:ALIAS")) -> None:
    """Everything recorded of one model version: lineage, metrics, the gate's decision, artifacts."""
    from dataclasses import asdict

    with _store() as store:
        model = store.get_model(ref)
    console.print_json(json.dumps(asdict(model), default=str))


@models_app.command("promote")
@user_errors
def models_promote(ref: str = typer.Argument(..., help="NAME or NAME:VERSION (default: the newest version)"),
                   alias: str = typer.Argument(..., help="Alias to move to it, e.g. production")) -> None:
    """Point ALIAS at a model version (moving it from the version that had it)."""
    name, _, version = ref.partition(":")
    with _store() as store:
        model = store.promote(name, alias, int(version) if version.isdigit() else None)
    console.print(f"{alias} -> {model.name}:{model.version}")


@models_app.command("delete")
@user_errors
def models_delete(ref: str = typer.Argument(..., help="NAME:VERSION")) -> None:
    """Delete a version's trained weights and checkpoints; its record stays."""
    from pathlib import Path

    from afina.pipeline.run_dir import delete_trained

    with _store() as store:
        model = store.delete_model(ref)
    if model.artifacts.get("run_dir"):
        delete_trained(Path(model.artifacts["run_dir"]))
    console.print(f"deleted {model.name}:{model.version} (record kept)")


@runs_app.command("list")
@user_errors
def runs_list(status: str = typer.Option(None, help="Only runs with this status"),
              limit: int = typer.Option(20, help="How many, newest first")) -> None:
    """Attempts with their status, decision and headline metric."""
    with _store() as store:
        runs = store.list_runs(status=status, limit=limit)
    table = Table(title="runs")
    for column in ("run", "status", "decision", "metric", "created"):
        table.add_column(column)
    for r in runs:
        metric = f"{r.metric_name} {r.metric_value:.3f}" if r.metric_name and r.metric_value is not None else ""
        table.add_row(r.id, r.status, r.decision or "", metric, r.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


@runs_app.command("show")
@user_errors
def runs_show(run_id: str = typer.Argument(..., help="Run id (the run directory's name)")) -> None:
    """One attempt: its stages with their figures, and its events."""
    with _store() as store:
        run, stages, events = store.get_run(run_id), store.stages(run_id), store.events(run_id)
    console.print(f"[bold]{run.id}[/] {run.status}" + (f", {run.decision}" if run.decision else "")
                  + (f" · {run.error_code}: {run.error_message}" if run.error_code else ""))
    table = Table(title="stages")
    for column in ("stage", "status", "seconds", "message"):
        table.add_column(column)
    for s in stages:
        seconds = f"{(s.finished_at - s.started_at).total_seconds():.1f}" if s.finished_at else ""
        table.add_row(s.name, s.status, seconds, s.message or "")
    console.print(table)
    for e in events:
        console.print(f"{e.created_at:%H:%M:%S} {e.level} {e.kind}: {e.message}")


audit_app = typer.Typer(help="The audit trail: who did what, in a hash chain that shows tampering.",
                        no_args_is_help=True)


@audit_app.command("list")
@user_errors
def audit_list(run_id: str = typer.Option(None, "--run", help="Only this run's events"),
               limit: int = typer.Option(50, help="How many, newest last")) -> None:
    """Events with who acted and what happened."""
    with _store() as store:
        events = store.events(run_id)[-limit:]
    table = Table(title="audit trail")
    for column in ("id", "time", "actor", "event", "run", "message"):
        table.add_column(column)
    for e in events:
        table.add_row(str(e.id), e.created_at.strftime("%Y-%m-%d %H:%M:%S"), e.actor or "", e.kind, e.run_id or "",
                      e.message)
    console.print(table)


@audit_app.command("verify")
@user_errors
def audit_verify() -> None:
    """Check the hash chain of every event; exit 1 at the first edited, deleted or reordered one."""
    with _store() as store:
        check = store.verify_events()
    if not check.ok:
        console.print(f"[red]audit trail broken[/] at event {check.broken_at}: {check.reason} "
                      f"({check.checked} events before it verified)")
        raise typer.Exit(1)
    console.print(f"audit trail intact: {check.checked} events; newest hash {check.last_hash} "
                  "(keep it elsewhere to detect removed newest events)")
