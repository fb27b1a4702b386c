"""The one error type users see: a stable code, where it happened, and what to do."""

from __future__ import annotations


class AfinaError(Exception):
    """A problem the user can act on. The CLI prints it as one line and exits with status 2.

    `code` is stable (scripts and tests match on it), `location` says where (file:line, a config
    key, a field), `hint` says what to do about it.
    """

    def __init__(self, code: str, message: str, location: str | None = None, hint: str | None = None):
        self.code = code
        self.message = message
        self.location = location
        self.hint = hint
        super().__init__(self.render())

    def render(self) -> str:
        where = f" at {self.location}" if self.location else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"error[{self.code}]{where}: {self.message}{hint}"


def render_warning(code: str, message: str, location: str | None = None) -> str:
    """A warning as one line, shaped like an error: `warning[code] at location: message`."""
    where = f" at {location}" if location else ""
    return f"warning[{code}]{where}: {message}"
