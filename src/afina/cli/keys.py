"""`afina keys`: API keys (each acts as its owner, until it expires or is revoked), and rotation of
the master key.

    afina keys create laptop --owner alice --expires-in 30d   # prints afn-... once
    afina keys list
    afina keys revoke laptop --owner alice
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from afina.cli.console import console, user_errors
from afina.cli.users import UserOption, acting_principal, open_user_store

keys_app = typer.Typer(help="API keys (created, listed, revoked) and the master key (rotated).", no_args_is_help=True)


@keys_app.command("create")
@user_errors
def create_command(
    name: Annotated[str, typer.Argument(help="What the key is for, e.g. ci or laptop")],
    owner: Annotated[str | None, typer.Option(
        "--owner", help="The user the key acts as (default: the acting user)")] = None,
    expires_in: Annotated[str | None, typer.Option(
        "--expires-in", help="When the key stops working: 90m, 12h, 30d, 2w (default: never)")] = None,
    user: UserOption = None,
) -> None:
    """Create a key and print it once: only its SHA-256 is kept. It acts as its owner, with the owner's roles."""
    from afina.jobs.keys import hash_api_key, new_api_key, parse_duration
    from afina.store.tables import utcnow

    expires = utcnow() + parse_duration(expires_in) if expires_in else None
    key = new_api_key()
    with open_user_store() as store:
        by = acting_principal(store, user)
        owner = owner or (by.user if store.has_users() else None)
        record = store.create_api_key(name, hash_api_key(key), expires, user=owner, by=by)
    print(key)
    until = f", expires {record.expires_at:%Y-%m-%d %H:%M} UTC" if record.expires_at else ""
    acts_as = f"acts as {owner}" if owner else "acts as an admin of the default project (the store has no users)"
    typer.echo(f"key {record.id} ({name}) {acts_as}{until}: shown only now; keep it in a secret store", err=True)


@keys_app.command("list")
@user_errors
def list_command(user: UserOption = None) -> None:
    """The keys: owner, state, when created, expiring or revoked (never the keys themselves)."""
    from afina.store.tables import utcnow

    with open_user_store() as store:
        keys = store.list_api_keys(by=acting_principal(store, user))
    now = utcnow()
    table = Table("id", "name", "owner", "state", "created", "expires", "revoked")
    for key in keys:
        table.add_row(str(key.id), key.name, key.user or "(admin of default)", key.state(now),
                      f"{key.created_at:%Y-%m-%d %H:%M}", f"{key.expires_at:%Y-%m-%d %H:%M}" if key.expires_at else "-",
                      f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "-")
    console.print(table)
    console.print(f"{len(keys)} keys, {sum(k.state(now) == 'live' for k in keys)} live")


@keys_app.command("revoke")
@user_errors
def revoke_command(
    name: Annotated[str, typer.Argument(help="The name the keys were created with")],
    owner: Annotated[str | None, typer.Option("--owner", help="Only this user's keys of that name")] = None,
    user: UserOption = None,
) -> None:
    """Revoke every live key with this name; requests with them get 401 from then on."""

    with open_user_store() as store:
        revoked = store.revoke_api_keys(name, user=owner, by=acting_principal(store, user))
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
