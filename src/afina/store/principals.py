"""Who acts on the store: principals, their roles in projects, and the names the store accepts for
projects, users and roles.

    principal = store.principal("alice")                  # her roles, project by project
    store.promote("tickets", "production", by=principal)  # checked by the store's authorizer

A user holds one role per project (`admin`, `engineer` or `viewer`); an API key acts as the user it
belongs to. What each role may do is not the store's to decide: the role x action table and the
check live in `afina.security.permissions`, and whoever opens a store that acts for users hands it
that check as its `Authorize` (`open_store(authorize=authorize)`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from afina.errors import AfinaError

ROLES = ("admin", "engineer", "viewer")
DEFAULT_PROJECT = "default"  # the registry, runs, users and keys belong to it; files and jobs name theirs
PROJECT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9@._+-]{0,199}")


@dataclass(frozen=True)
class Principal:
    """Someone acting: a user of the store (through an API key or the CLI) and their roles."""

    user: str
    roles: Mapping[str, str] = field(default_factory=dict)  # project -> role
    everywhere: str | None = None  # a role held in every project: the owner of a store without users

    def role_in(self, project: str) -> str | None:
        return self.roles.get(project, self.everywhere)


# (principal, action, project) -> None when allowed; AfinaError `permission_denied` otherwise
Authorize = Callable[[Principal, str, str], None]


def owner(name: str) -> Principal:
    """Whoever opens a store that has no users yet: a single-user installation, where the database's
    own access rights are the boundary. Admin of every project."""
    return Principal(name, everywhere="admin")


def check_project_name(project: str) -> str:
    if not PROJECT_NAME.fullmatch(project):
        raise AfinaError("bad_project_name", f"{project!r} is not a project name", location=project,
                         hint="use lower-case letters, digits, '.', '_' and '-' (at most 64)")
    return project


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AfinaError("bad_role", f"{role!r} is not a role", location=role, hint=f"use one of {', '.join(ROLES)}")
    return role


def check_user_name(name: str) -> str:
    if not USER_NAME.fullmatch(name):
        raise AfinaError("bad_user_name", f"{name!r} is not a user name", location=name,
                         hint="use letters, digits and @ . _ + -, starting with a letter or digit (e.g. an e-mail)")
    return name
