"""Reads of a page that stop at a byte budget in the database."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # _lifecycle_sql's listings read through this module
    from memsvc.store._lifecycle_sql import Connection, Dialect


async def read_within_budget(
    conn: Connection,
    dialect: Dialect,
    select: str,
    params: Sequence[Any],
    order: str,
    limit: int,
    byte_budget: int,
) -> tuple[list[Any], bool]:
    """The first ``limit`` rows of ``select`` in ``order`` that start within
    ``byte_budget`` bytes, by its last column ``weight``, and whether the budget
    left any of the ``limit`` out.

    A page of 1,000 rows of a megabyte each would otherwise be read whole (into
    memsvc's memory) to send the few that fit in a response. The rows past the
    budget are weighed in the database, never sent: ``weight`` is an estimate
    from lengths (octet_length, pg_column_size, SQLite's length), which on
    PostgreSQL read no value at all. The first row always comes, and so does the
    row that crosses the budget: the caller's exact budget (page_of) decides
    whether it fits.
    """
    # The first ``limit`` rows first (an index scan, or a top-N sort), then the
    # running sum over those alone; ROWS: row by row (ids break every tie).
    # ``total``: how many the limit kept, so a cut is told from the end of the rows.
    cursor = await dialect.execute_bulk_read(
        conn,
        f"SELECT * FROM (SELECT page.*, sum(weight) OVER (ORDER BY {order}"
        " ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS running,"
        " count(*) OVER () AS total"
        f" FROM (SELECT * FROM ({select}) matching ORDER BY {order} LIMIT {int(limit)}) page)"
        f" cut WHERE running - weight <= {int(byte_budget)} ORDER BY {order}",
        params,
    )
    rows = await cursor.fetchall()
    return [row[:-3] for row in rows], bool(rows) and len(rows) < rows[-1][-1]


def next_page_condition(columns: Sequence[str], cursor: Sequence[Any]) -> tuple[str, list[Any]]:
    """The condition that a row comes after ``cursor`` (the last row sent) in the
    order ``columns`` DESC, as the next page of a newest-first listing, and its
    parameters.

    ``c1 <= ? AND (c1 < ? OR (c1 = ? AND (c2 < ? OR ...)))``: the leading
    ``c1 <= ?`` is a range that an index on ``c1`` starts from. The OR alone is a
    filter, which PostgreSQL and SQLite test on every row from the newest, so the
    k-th page read k pages of the index. (A row comparison ``(c1, c2) < (?, ?)``
    bounds the scan as well, but only on an index whose columns all sort one way.)
    """
    condition, params = _strictly_below(columns, cursor)
    if len(columns) == 1:
        return condition, params
    return f"{columns[0]} <= ? AND {condition}", [cursor[0], *params]


def _strictly_below(columns: Sequence[str], cursor: Sequence[Any]) -> tuple[str, list[Any]]:
    column, value = columns[0], cursor[0]
    if len(columns) == 1:
        return f"{column} < ?", [value]
    rest, params = _strictly_below(columns[1:], cursor[1:])
    return f"({column} < ? OR ({column} = ? AND {rest}))", [value, value, *params]
