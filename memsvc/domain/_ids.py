"""Identifiers: the rules for project, agent instance and session ids and keys.

The rules are part of the contract (see ``proto/memsvc/v1/working_memory.proto``):

- ``project_id`` and ``agent_instance_id``: a UUID in canonical 8-4-4-4-12 hex
  form, any case; stored lower-cased so one id has one spelling.
- ``session_id``: 1 to 128 printable ASCII characters (0x21-0x7E), no spaces.
- key: 1 to 512 bytes of UTF-8 with no control characters.

Validators return the violations they find instead of raising, so one error can
name every bad field of a request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memsvc.domain._errors import FieldViolation, InvalidArgument

MAX_SESSION_ID_CHARS = 128
MAX_KEY_BYTES = 512

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_SESSION_ID = re.compile(rf"[\x21-\x7e]{{1,{MAX_SESSION_ID_CHARS}}}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(frozen=True, slots=True)
class SessionRef:
    """The identity of one session: (project, agent instance, session)."""

    project_id: str
    agent_instance_id: str
    session_id: str

    def within(self, scope: SessionRef) -> bool:
        """Whether this session is in ``scope`` (a purge's: empty agent instance
        or session ids match every one)."""
        return (
            self.project_id == scope.project_id
            and scope.agent_instance_id in ("", self.agent_instance_id)
            and scope.session_id in ("", self.session_id)
        )


def check_uuid(value: str, field: str, violations: list[FieldViolation]) -> str:
    """Validate a UUID field; return its canonical lower-case form."""
    if not value:
        violations.append(
            FieldViolation(
                field, "is required (a UUID such as '0f8fad5b-d9cb-469f-a165-70867728950e')"
            )
        )
    elif not _UUID.fullmatch(value):
        violations.append(
            FieldViolation(field, f"must be a UUID in 8-4-4-4-12 hex form, got {value[:64]!r}")
        )
    return value.lower()


def check_request_id(request_id: str, violations: list[FieldViolation]) -> str:
    """An optional request id (empty: none) must be a UUID; its canonical form, so
    that a retry spelling it in another case is the same request."""
    return check_uuid(request_id, "request_id", violations) if request_id else ""


def check_session_id(value: str, field: str, violations: list[FieldViolation]) -> str:
    """Validate a session id: 1 to 128 printable ASCII characters, no spaces."""
    if not value:
        violations.append(FieldViolation(field, "is required"))
    elif not _SESSION_ID.fullmatch(value):
        if len(value) > MAX_SESSION_ID_CHARS:
            problem = f"is {len(value)} characters long, over the maximum of {MAX_SESSION_ID_CHARS}"
        else:
            problem = "may only contain printable ASCII characters (0x21-0x7E), no spaces"
        violations.append(FieldViolation(field, problem))
    return value


def check_key(value: str, field: str, violations: list[FieldViolation]) -> str:
    """Validate a working-memory key: 1 to 512 bytes of UTF-8, no control characters."""
    if not value:
        violations.append(FieldViolation(field, "is required (a non-empty string)"))
        return value
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_BYTES:
        violations.append(
            FieldViolation(field, f"is {size} bytes of UTF-8, over the maximum of {MAX_KEY_BYTES}")
        )
    elif _CONTROL.search(value):
        violations.append(FieldViolation(field, "must not contain control characters"))
    return value


def check_session_ref(
    project_id: str, agent_instance_id: str, session_id: str, violations: list[FieldViolation]
) -> SessionRef:
    """Validate the three scope fields of a request and return the session they name."""
    return SessionRef(
        check_uuid(project_id, "project_id", violations),
        check_uuid(agent_instance_id, "agent_instance_id", violations),
        check_session_id(session_id, "session_id", violations),
    )


def raise_if_any(violations: list[FieldViolation]) -> None:
    """Raise one InvalidArgument naming every violation found, if there are any."""
    if violations:
        raise InvalidArgument(violations)
