"""Who may do what: roles scoped to projects, and one literal table of what each role may do.

    principal = store.principal("alice")                 # her roles, project by project
    authorize(principal, "promote_model", "default")     # AfinaError permission_denied if not allowed

A user holds one role per project (`admin`, `engineer` or `viewer`); an API key acts as the user it
belongs to. The store calls `authorize` inside the methods that the API's routes and the CLI's
commands call, so a new route or command cannot forget the check; a denied attempt is refused
before anything changes, and the store records it in the audit trail.

The table is deliberately small and explicit: a reviewer reads it in one glance, and a test holds
its own copy, checked role by role and action by action through the API and the CLI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from afina.errors import AfinaError

ROLES = ("admin", "engineer", "viewer")
DEFAULT_PROJECT = "default"  # the registry, runs, users and keys belong to it; files and jobs name theirs
PROJECT_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9@._+-]{0,199}")

# action -> the roles that may take it. Promoting and deleting models is kept from the engineers who
# train them (a second person puts a model in production); the audit log is for admins.
PERMISSIONS: dict[str, tuple[str, ...]] = {
    "upload_data": ("admin", "engineer"),
    "read_data": ("admin", "engineer"),
    "start_job": ("admin", "engineer"),
    "cancel_job": ("admin", "engineer"),
    "read_results": ("admin", "engineer", "viewer"),
    "promote_model": ("admin",),
    "delete_model": ("admin",),
    "use_model": ("admin", "engineer", "viewer"),
    "manage_users": ("admin",),
    "read_audit": ("admin",),
}
ACTIONS = tuple(PERMISSIONS)


@dataclass(frozen=True)
class Principal:
    """Someone acting: a user of the store (through an API key or the CLI) and their roles."""

    user: str
    roles: Mapping[str, str] = field(default_factory=dict)  # project -> role
    everywhere: str | None = None  # a role held in every project: the owner of a store without users

    def role_in(self, project: str) -> str | None:
        return self.roles.get(project, self.everywhere)


def owner(name: str) -> Principal:
    """Whoever opens a store that has no users yet: a single-user installation, where the database's
    own access rights are the boundary. Admin of every project."""
    return Principal(name, everywhere="admin")


def allows(role: str | None, action: str) -> bool:
    """Whether `role` may take `action` (no role: nothing)."""
    if action not in PERMISSIONS:
        raise ValueError(f"unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    return role in PERMISSIONS[action]


def authorize(principal: Principal, action: str, project: str) -> None:
    """Nothing when `principal` may take `action` in `project`; AfinaError `permission_denied` otherwise."""
    role = principal.role_in(project)
    if allows(role, action):
        return
    held = f"is {role} in project {project}" if role else f"has no role in project {project}"
    needed = " or ".join(PERMISSIONS[action])
    raise AfinaError("permission_denied", f"{principal.user} may not {action.replace('_', ' ')}: {principal.user} "
                     f"{held}", location=f"project {project}",
                     hint=f"this needs the {needed} role; an admin grants it with "
                          f"`afina users grant {principal.user} {project} ROLE`")


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
