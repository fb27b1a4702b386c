"""`afina keys`: API keys of the jobs service (`afina server`), and rotation of the master key."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from afina.cli.console import console, user_errors

keys_app = typer.Typer(help="API keys of the jobs service: created, listed, revoked.", no_args_is_help=True)


@keys_app.command("create")
@user_errors
def create_command(
    name: str = typer.Argument(..., help="Who or what the key is for, e.g. ci or alice"),
    expires_days: float = typer.Option(None, "--expires-days", help="Days until the key stops working (default: never)"),
) -> None:
    """Create a key and print it once: only its SHA-256 is kept."""
    from afina.jobs.keys import hash_api_key, new_api_key
    from afina.store import open_store
    from afina.store.tables import utcnow

    key = new_api_key()
    expires = utcnow() + timedelta(days=expires_days) if expires_days else None
    with open_store() as store:
        record = store.create_api_key(name, hash_api_key(key), expires)
    print(key)
    until = f", expires {record.expires_at:%Y-%m-%d %H:%M} UTC" if record.expires_at else ""
    typer.echo(f"key {record.id} for {name}{until}: shown only now; keep it in a secret store", err=True)


@keys_app.command("list")
@user_errors
def list_command() -> None:
    """The keys: name, when created, revoked or expiring (never the keys themselves)."""
    from afina.store import open_store

    with open_store() as store:
        keys = store.list_api_keys()
    table = Table("id", "name", "created", "expires", "revoked")
    for key in keys:
        table.add_row(str(key.id), key.name, f"{key.created_at:%Y-%m-%d %H:%M}",
                      f"{key.expires_at:%Y-%m-%d %H:%M}" if key.expires_at else "-",
                      f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "-")
    console.print(table)
    console.print(f"{len(keys)} keys, {sum(k.revoked_at is None for k in keys)} not revoked")


@keys_app.command("revoke")
@user_errors
def revoke_command(name: str = typer.Argument(..., help="The name the keys were created with")) -> None:
    """Revoke every live key with this name; requests with them get 401 from then on."""
    from afina.store import open_store

    with open_store() as store:
        revoked = store.revoke_api_keys(name)
    console.print(f"revoked {len(revoked)} key(s) named {name}", markup=False, highlight=False)


@keys_app.command("rotate")
@user_errors
def rotate_command(
    new_key_file: Annotated[Path | None, typer.Option(
        "--new-key-file", help="File holding the new master key (mode 600); default: the AFINA_NEW_MASTER_KEY variable")
    ] = None,
) -> None:
    """Re-wrap every encrypted file's data key under a new master key (the data is not rewritten)."""
    from afina.security.rotation import rotate_master_key_command

    console.print(rotate_master_key_command(new_key_file), markup=False, highlight=False, soft_wrap=True)
