"""Users and their roles in projects; who an API key or a CLI user acts as.

    store.add_user("alice", by=admin)                          # by: the Principal acting
    store.grant("alice", "default", "engineer", by=admin)
    principal = store.principal("alice")                       # her roles, for the store's check
    key, principal = store.principal_for_key(hash_api_key(k))  # None for an unknown, revoked or expired key

Users are never deleted: removing one keeps their record, because the audit trail names them, and
ends their memberships and their keys in the same transaction. Every change here is an audit event
naming who made it; the default project's admins manage users and keys. The last admin of the
default project cannot be removed or demoted: that would leave nobody able to manage users.
`Store` inherits these methods; the transactions come from it.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from afina.errors import AfinaError
from afina.store.audit import append_event, audit_details
from afina.store.jobs import api_key_record, live_key_query
from afina.store.principals import DEFAULT_PROJECT, Principal, check_project_name, check_role, check_user_name
from afina.store.records import ApiKey, User
from afina.store.tables import ApiKeyRow, MembershipRow, UserRow, utcnow


class UserRecords:
    """Users, memberships and the principals behind API keys; mixed into `Store`."""

    url: str

    def has_users(self) -> bool:
        """Whether any user was ever added: until then the store is a single-user installation."""
        with self._read() as session:
            return bool(session.scalar(select(func.count()).select_from(UserRow)))

    def list_users(self, *, include_removed: bool = False, by: Principal | None = None) -> list[User]:
        """Users by name, with their roles."""
        self.check_permission(by, "manage_users", DEFAULT_PROJECT)
        query = select(UserRow).order_by(UserRow.name)
        if not include_removed:
            query = query.where(UserRow.removed_at.is_(None))
        with self._read() as session:
            return [user_record(session, row) for row in session.scalars(query)]

    def principal(self, name: str) -> Principal:
        """The user `name` as someone acting; AfinaError `user_not_found` for an unknown or removed user."""
        with self._read() as session:
            row = self._user_row(session, name)
            return Principal(row.name, user_roles(session, row.id))

    def principal_for_key(self, sha256: str) -> tuple[ApiKey, Principal] | None:
        """The live key with this hash and the principal it acts as; None for an unknown, revoked or
        expired key, or one whose user was removed. A key without a user predates users: it acts as
        an admin of the default project."""
        with self._read() as session:
            key = session.scalars(live_key_query(sha256)).one_or_none()
            if key is None:
                return None
            if key.user_id is None:
                return api_key_record(key, None), Principal(f"key:{key.name}", {DEFAULT_PROJECT: "admin"})
            user = session.get(UserRow, key.user_id)
            if user.removed_at is not None:
                return None
            return api_key_record(key, user.name), Principal(user.name, user_roles(session, user.id))

    def add_user(self, name: str, *, project: str | None = None, role: str | None = None,
                 by: Principal | None = None) -> User:
        """Add a user, with a role in `project` when given. The first user must be an admin of the
        default project: from then on the CLI acts only as a named user."""
        check_user_name(name)
        if role is not None:
            check_role(role)
            check_project_name(project or DEFAULT_PROJECT)
        self.check_permission(by, "manage_users", DEFAULT_PROJECT, name)
        with self._write("users") as session:
            if session.scalars(select(UserRow).where(UserRow.name == name)).one_or_none() is not None:
                raise AfinaError("user_exists", f"a user {name!r} exists already", location=name,
                                 hint="`afina users list --removed` shows every user; pick another name")
            first = not session.scalar(select(func.count()).select_from(UserRow))
            if first and ((project or DEFAULT_PROJECT) != DEFAULT_PROJECT or role != "admin"):
                raise AfinaError("first_user_not_admin", "the first user must be an admin of the default project",
                                 location=name, hint=f"afina users add {name} --role admin")
            row = UserRow(name=name, created_at=utcnow())
            session.add(row)
            session.flush()
            if role is not None:
                session.add(MembershipRow(user_id=row.id, project=project or DEFAULT_PROJECT, role=role,
                                          created_at=utcnow()))
                session.flush()
            append_event(session, None, "user_added", "info", f"added user {name}",
                         {**audit_details("manage_users", DEFAULT_PROJECT, name),
                          "grant": {project or DEFAULT_PROJECT: role} if role else {}}, actor=by and by.user)
            return user_record(session, row)

    def grant(self, name: str, project: str, role: str, *, by: Principal | None = None) -> User:
        """Give the user `role` in `project` (replacing the role they had there)."""
        check_project_name(project)
        check_role(role)
        self.check_permission(by, "manage_users", project, name)
        with self._write("users") as session:
            row = self._user_row(session, name)
            membership = session.get(MembershipRow, (row.id, project))
            if membership is None:
                session.add(MembershipRow(user_id=row.id, project=project, role=role, created_at=utcnow()))
            else:
                if membership.role == "admin" and role != "admin":
                    self._keep_an_admin(session, project, row.id)
                membership.role = role
            session.flush()
            append_event(session, None, "role_granted", "info", f"{name} is {role} in project {project}",
                         {**audit_details("manage_users", project, name), "role": role}, actor=by and by.user)
            return user_record(session, row)

    def revoke_role(self, name: str, project: str, *, by: Principal | None = None) -> User:
        """Take away the user's role in `project`."""
        check_project_name(project)
        self.check_permission(by, "manage_users", project, name)
        with self._write("users") as session:
            row = self._user_row(session, name)
            membership = session.get(MembershipRow, (row.id, project))
            if membership is None:
                raise AfinaError("role_not_found", f"{name} has no role in project {project}", location=name,
                                 hint="`afina users list` shows each user's roles")
            if membership.role == "admin":
                self._keep_an_admin(session, project, row.id)
            session.delete(membership)
            session.flush()
            append_event(session, None, "role_revoked", "info", f"{name} has no role in project {project} any more",
                         audit_details("manage_users", project, name), actor=by and by.user)
            return user_record(session, row)

    def remove_user(self, name: str, *, by: Principal | None = None) -> User:
        """Remove a user: their roles end and their keys are revoked; their record stays."""
        self.check_permission(by, "manage_users", DEFAULT_PROJECT, name)
        with self._write("users") as session:
            row = self._user_row(session, name)
            memberships = session.scalars(select(MembershipRow).where(MembershipRow.user_id == row.id)).all()
            for membership in memberships:
                if membership.role == "admin":
                    self._keep_an_admin(session, membership.project, row.id)
                session.delete(membership)
            now = utcnow()
            keys = session.scalars(select(ApiKeyRow).where(ApiKeyRow.user_id == row.id,
                                                           ApiKeyRow.revoked_at.is_(None))).all()
            for key in keys:
                key.revoked_at = now
            row.removed_at = now
            session.flush()
            append_event(session, None, "user_removed", "info", f"removed user {name} and revoked {len(keys)} key(s)",
                         {**audit_details("manage_users", DEFAULT_PROJECT, name), "keys_revoked": len(keys)},
                         actor=by and by.user)
            return user_record(session, row)

    def _user_row(self, session: Session, name: str) -> UserRow:
        row = session.scalars(select(UserRow).where(UserRow.name == name, UserRow.removed_at.is_(None))).one_or_none()
        if row is None:
            raise AfinaError("user_not_found", f"no user {name!r}", location=self.url,
                             hint="`afina users list` shows the users; an admin adds one with `afina users add`")
        return row

    def _keep_an_admin(self, session: Session, project: str, user_id: int) -> None:
        """Refuse to take the default project's last admin away: nobody could manage users after that."""
        if project != DEFAULT_PROJECT:
            return
        others = session.scalar(select(func.count()).select_from(MembershipRow).where(
            MembershipRow.project == DEFAULT_PROJECT, MembershipRow.role == "admin", MembershipRow.user_id != user_id))
        if not others:
            raise AfinaError("last_admin", "this is the last admin of the default project", location=DEFAULT_PROJECT,
                             hint="make another user admin first: afina users grant NAME default admin")


def user_roles(session: Session, user_id: int) -> dict[str, str]:
    query = select(MembershipRow).where(MembershipRow.user_id == user_id).order_by(MembershipRow.project)
    return {m.project: m.role for m in session.scalars(query)}


def user_record(session: Session, row: UserRow) -> User:
    return User(id=row.id, name=row.name, created_at=row.created_at, removed_at=row.removed_at,
                roles=user_roles(session, row.id))
