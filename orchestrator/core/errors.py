"""Domain errors carry their HTTP status; one handler in the API turns them into `{"detail": ...}`."""

from __future__ import annotations


class DomainError(Exception):
    status_code = 400

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadRequest(DomainError):
    status_code = 400


class NotFound(DomainError):
    status_code = 404


class Unauthorized(DomainError):
    status_code = 401


class Forbidden(DomainError):
    status_code = 403


class Conflict(DomainError):
    status_code = 409


class InvalidTransition(BadRequest):
    """A state change the transition table does not allow, or that lost a race."""

    def __init__(self, entity: str, entity_id: str, current: str, target: str) -> None:
        super().__init__(f"Invalid state transition for {entity} {entity_id}: {current} -> {target}")
        self.current = current
        self.target = target


class FieldInvalid(DomainError):
    """A body field that is well-formed but not acceptable here (e.g. over the depth's quota).

    Answered 422 in FastAPI's standard list form, like any other validation error.
    """

    status_code = 422

    def __init__(self, field: str, message: str, value: object) -> None:
        super().__init__(message)
        self.field = field
        self.value = value

    def as_detail(self) -> list[dict[str, object]]:
        return [{"type": "value_error", "loc": ["body", self.field], "msg": self.detail, "input": self.value}]
