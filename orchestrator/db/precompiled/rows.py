"""The rows precompiled statements return: attribute access and unpacking like SQLAlchemy's Row."""

from __future__ import annotations

import keyword
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


class Record:
    """A row: attribute access and unpacking like SQLAlchemy's Row, and assignable, so the engine
    can keep a row it changed as written (as it would an ORM object) without reading it again."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def __init__(self, values: Iterable[Any]) -> None:  # each row type has its own (record_type)
        for name, value in zip(self._fields, values, strict=True):
            object.__setattr__(self, name, value)

    def __iter__(self) -> Iterator[Any]:
        return (getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Record) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Row(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields) + ")"

    def __getattr__(self, name: str) -> Any:  # only for names that are not columns
        raise AttributeError(f"the row has no column {name!r}")


def record_type(columns: Sequence[Any]) -> type[Record]:
    """A Record class for a statement's columns (a repeated name gets a suffix: status, status_1)."""
    fields: list[str] = []
    for i, column in enumerate(columns):
        name = str(getattr(column, "key", None) or f"c{i}")
        if not name.isidentifier() or keyword.iskeyword(name) or name.startswith("_"):
            name = f"c{i}"
        while name in fields:
            name = f"{name}_1"
        fields.append(name)
    row_type = type("Row", (Record,), {"__slots__": tuple(fields), "_fields": tuple(fields)})
    if fields:
        # One unpacking assignment instead of a loop over the fields (what namedtuple does too):
        # the engine makes thousands of rows a second. The names are identifiers (checked above).
        namespace: dict[str, Any] = {}
        targets = ", ".join(f"self.{name}" for name in fields)
        exec(f"def __init__(self, values):\n    {targets}, = values", namespace)
        row_type.__init__ = namespace["__init__"]  # type: ignore[misc]
    return row_type
