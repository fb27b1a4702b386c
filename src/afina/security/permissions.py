"""Who may do what: one literal table of what each role may do in a project, and the check.

    principal = store.principal("alice")                 # her roles, project by project
    authorize(principal, "promote_model", "default")     # AfinaError permission_denied if not allowed

Principals, roles and projects are the store's vocabulary (`afina.store.principals`); this module
decides what a role allows. The layers that act for users (the CLI's commands, the jobs API, the
inference service) open the store with `open_store(authorize=authorize)`, or hand `authorize` to a
store they are given (`Store.check_permissions_with`). The store then calls it inside the methods
that take `by=`, so a new route or command cannot forget the check: a denied attempt is refused
before anything changes and recorded in the audit trail, and a store that was given no check
refuses every `by=` call.

The table is deliberately small and explicit: a reviewer reads it in one glance, and a test holds
its own copy, checked role by role and action by action through the API and the CLI.
"""

from __future__ import annotations

from afina.errors import AfinaError
from afina.store.principals import Principal

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
