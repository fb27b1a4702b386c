"""`afina models ...`, `afina runs ...` and `afina audit ...`: the registry of model versions, the
record of attempts and the audit trail. Each command acts as `--user` (or `AFINA_USER`) and is
checked against that user's role in the default project, to which the registry belongs."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from afina.cli.console import console, user_errors
from afina.cli.users import UserOption, acting_principal, open_user_store
from afina.errors import AfinaError

models_app = typer.Typer(help="Registered model versions: list, show, promote an alias, delete.",
                         no_args_is_help=True)
runs_app = typer.Typer(help="Every attempt of `afina run`: its stages, decision and figures.", no_args_is_help=True)


@models_app.command("list")
@user_errors
def models_list(name: str = typer.Argument(None, help="Only this model name"),
                deleted: bool = typer.Option(False, "--deleted", help="Include deleted versions"),
                user: UserOption = None) -> None:
    """Model versions, newest first, with their aliases and headline figures."""
    with open_user_store() as store:
        models = store.list_models(name, include_deleted=deleted, by=acting_principal(store, user))
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
def models_show(ref: str = typer.Argument(..., help="NAME, NAME:VERSION or NAME:ALIAS"),
                user: UserOption = None) -> None:
    """Everything recorded of one model version: lineage, metrics, the gate's decision, artifacts."""
    from dataclasses import asdict

    with open_user_store() as store:
        model = store.get_model(ref, by=acting_principal(store, user))
    console.print_json(json.dumps(asdict(model), default=str))


@models_app.command("promote")
@user_errors
def models_promote(ref: str = typer.Argument(..., help="NAME or NAME:VERSION (default: the newest version)"),
                   alias: str = typer.Argument(..., help="Alias to move to it, e.g. production"),
                   user: UserOption = None) -> None:
    """Point ALIAS at a model version (moving it from the version that had it)."""
    name, _, version = ref.partition(":")
    with open_user_store() as store:
        model = store.promote(name, alias, int(version) if version.isdigit() else None,
                              by=acting_principal(store, user))
    console.print(f"{alias} -> {model.name}:{model.version}")


@models_app.command("delete")
@user_errors
def models_delete(ref: str = typer.Argument(..., help="NAME:VERSION"), user: UserOption = None) -> None:
    """Delete a version's trained weights and checkpoints; its record stays."""
    from pathlib import Path

    from afina.pipeline.run_dir import delete_trained

    with open_user_store() as store:
        model = store.delete_model(ref, by=acting_principal(store, user))
    if model.artifacts.get("run_dir"):
        delete_trained(Path(model.artifacts["run_dir"]))
    console.print(f"deleted {model.name}:{model.version} (record kept)")


@runs_app.command("list")
@user_errors
def runs_list(status: str = typer.Option(None, help="Only runs with this status"),
              limit: int = typer.Option(20, help="How many, newest first"), user: UserOption = None) -> None:
    """Attempts with their status, decision and headline metric."""
    with open_user_store() as store:
        runs = store.list_runs(status=status, limit=limit, by=acting_principal(store, user))
    table = Table(title="runs")
    for column in ("run", "status", "decision", "metric", "created"):
        table.add_column(column)
    for r in runs:
        metric = f"{r.metric_name} {r.metric_value:.3f}" if r.metric_name and r.metric_value is not None else ""
        table.add_row(r.id, r.status, r.decision or "", metric, r.created_at.strftime("%Y-%m-%d %H:%M"))
    console.print(table)


@runs_app.command("show")
@user_errors
def runs_show(run_id: str = typer.Argument(..., help="Run id (the run directory's name)"),
              user: UserOption = None) -> None:
    """One attempt: its stages with their figures, and its events."""
    with open_user_store() as store:
        run = store.get_run(run_id, by=acting_principal(store, user))
        stages, events = store.stages(run_id), store.events(run_id)
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


ActingAs = Annotated[str | None, typer.Option(
    "--as", envvar="AFINA_USER", help="Who is acting (default: AFINA_USER); needed once the store has users")]


@audit_app.command("list")
@user_errors
def audit_list(
    run_id: Annotated[str | None, typer.Option("--run", help="Only this run's events")] = None,
    user: Annotated[str | None, typer.Option("--user", help="Only what this user did")] = None,
    action: Annotated[str | None, typer.Option(
        "--action", help="Only this action or event kind, e.g. promote_model, permission_denied, job_created")] = None,
    resource: Annotated[str | None, typer.Option(
        "--resource", help="Only events about this: a model (NAME or NAME:VERSION), run, file, job, user or key")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", help="Only events since then: a date or time (2026-12-01, 2026-12-01T09:00) or a span ago (12h, 7d)")
    ] = None,
    limit: Annotated[int, typer.Option(help="How many, newest last")] = 50,
    acting_as: ActingAs = None,
) -> None:
    """Events with who acted, what happened, on what, and how it ended."""
    start = parse_since(since) if since else None
    with open_user_store() as store:
        events = store.events(run_id, actor=user, action=action, resource=resource, since=start,
                              by=acting_principal(store, acting_as))[-limit:]
    table = Table(title="audit trail")
    for column in ("id", "time", "actor", "event", "resource", "outcome", "message"):
        table.add_column(column)
    for e in events:
        details = e.details or {}
        table.add_row(str(e.id), e.created_at.strftime("%Y-%m-%d %H:%M:%S"), e.actor or "", e.kind,
                      details.get("resource") or details.get("model") or e.run_id or "",
                      details.get("outcome", "succeeded"), e.message)
    console.print(table)
    console.print(f"{len(events)} events")


def parse_since(text: str) -> datetime:
    """A point in time, UTC unless the text names a zone: an ISO date or time, or a span ago (12h, 7d)."""
    from datetime import UTC

    from afina.jobs.keys import parse_duration

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            return datetime.now(UTC) - parse_duration(text)
        except AfinaError:
            raise AfinaError("bad_time", f"{text!r} is not a time", location="--since",
                             hint="write a date or time (2026-12-01, 2026-12-01T09:00) or a span ago (12h, 7d)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@audit_app.command("verify")
@user_errors
def audit_verify(acting_as: ActingAs = None) -> None:
    """Check the hash chain of every event; exit 1 at the first edited, deleted or reordered one."""
    with open_user_store() as store:
        check = store.verify_events(by=acting_principal(store, acting_as))
    if not check.ok:
        console.print(f"[red]audit trail broken[/] at event {check.broken_at}: {check.reason} "
                      f"({check.checked} events before it verified)")
        raise typer.Exit(1)
    console.print(f"audit trail intact: {check.checked} events; newest hash {check.last_hash} "
                  "(keep it elsewhere to detect removed newest events)")
