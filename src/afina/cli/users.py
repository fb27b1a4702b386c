"""`afina users`: who may act on the store, with which role in which project; and who the CLI acts as.

    afina users add alice --role admin                  # the first user: an admin of the default project
    export AFINA_USER=alice                             # from now on the CLI acts as a named user
    afina users add bob --project legal --role engineer
    afina users grant bob default viewer
    afina users list
    afina users remove bob                              # roles end, keys revoked, record kept

A store without users is a single-user installation: the CLI acts as the user running it, with
every permission, as afina did before users existed. Once a user is added, each command that reads
or changes the store acts as `--user` (or `AFINA_USER`), checked by the same permission matrix as
the API. The CLI names a user rather than proving who it is: whoever can open the database can
change it, so the database's own access rights stay the boundary; the check keeps each person to
their role and the audit trail names them.
"""

from __future__ import annotations

import getpass
from typing import Annotated

import typer
from rich.table import Table

from afina.cli.console import console, user_errors
from afina.errors import AfinaError
from afina.store.principals import DEFAULT_PROJECT, ROLES, Principal, owner

UserOption = Annotated[str | None, typer.Option(
    "--user", envvar="AFINA_USER", help="Who is acting (default: AFINA_USER); needed once the store has users")]

users_app = typer.Typer(help="Users and their roles in projects (admin, engineer, viewer).", no_args_is_help=True)


def acting_principal(store, user: str | None) -> Principal:
    """Who the CLI acts as: the named user; the machine's user (with every permission) while the
    store has no users; AfinaError `user_required` when it has users and none was named."""
    if user:
        return store.principal(user)
    if not store.has_users():
        return owner(local_user())
    raise AfinaError("user_required", "this store has users: say which one you are", location=store.url,
                     hint="pass --user NAME or set AFINA_USER=NAME (`afina users list` shows the users)")


def local_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def open_user_store():
    """The store, checking what the acting user may do (`afina.security.permissions`)."""
    from afina.security.permissions import authorize
    from afina.store import open_store

    return open_store(authorize=authorize)


@users_app.command("add")
@user_errors
def add_command(
    name: Annotated[str, typer.Argument(help="The new user's name, e.g. an e-mail address")],
    role: Annotated[str | None, typer.Option("--role", help=f"A role in --project: {', '.join(ROLES)}")] = None,
    project: Annotated[str, typer.Option("--project", help="The project of --role")] = DEFAULT_PROJECT,
    user: UserOption = None,
) -> None:
    """Add a user (an admin of the default project does this), with a role in a project."""
    with open_user_store() as store:
        added = store.add_user(name, project=project, role=role, by=acting_principal(store, user))
    roles = ", ".join(f"{r} in {p}" for p, r in added.roles.items()) or "no role yet"
    console.print(f"added user {added.name}: {roles}; keys: afina keys create NAME --owner {added.name}",
                  markup=False, highlight=False)


@users_app.command("grant")
@user_errors
def grant_command(
    name: Annotated[str, typer.Argument(help="The user")],
    project: Annotated[str, typer.Argument(help="The project")],
    role: Annotated[str, typer.Argument(help=f"The role: {', '.join(ROLES)}")],
    user: UserOption = None,
) -> None:
    """Give a user a role in a project (replacing the one they had there)."""
    with open_user_store() as store:
        store.grant(name, project, role, by=acting_principal(store, user))
    console.print(f"{name} is {role} in project {project}", markup=False, highlight=False)


@users_app.command("revoke")
@user_errors
def revoke_command(
    name: Annotated[str, typer.Argument(help="The user")],
    project: Annotated[str, typer.Argument(help="The project")],
    user: UserOption = None,
) -> None:
    """Take a user's role in a project away."""
    with open_user_store() as store:
        store.revoke_role(name, project, by=acting_principal(store, user))
    console.print(f"{name} has no role in project {project} any more", markup=False, highlight=False)


@users_app.command("remove")
@user_errors
def remove_command(name: Annotated[str, typer.Argument(help="The user")], user: UserOption = None) -> None:
    """Remove a user: their roles end and their API keys stop working; their record stays for the audit trail."""
    with open_user_store() as store:
        store.remove_user(name, by=acting_principal(store, user))
    console.print(f"removed {name}: roles ended, keys revoked (record kept)", markup=False, highlight=False)


@users_app.command("list")
@user_errors
def list_command(
    removed: Annotated[bool, typer.Option("--removed", help="Include removed users")] = False,
    user: UserOption = None,
) -> None:
    """Users with their role in each project."""
    with open_user_store() as store:
        users = store.list_users(include_removed=removed, by=acting_principal(store, user))
    table = Table("user", "roles", "added", "removed")
    for u in users:
        table.add_row(u.name, ", ".join(f"{p}: {r}" for p, r in u.roles.items()), f"{u.created_at:%Y-%m-%d %H:%M}",
                      f"{u.removed_at:%Y-%m-%d %H:%M}" if u.removed_at else "-")
    console.print(table)
    console.print(f"{len(users)} users")
