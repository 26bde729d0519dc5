"""Reads of a page that stop at a byte budget in the database."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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
    left any out.

    A page of 1,000 rows of a megabyte each would otherwise be read whole (into
    memsvc's memory) to send the few that fit in a response. The rows past the
    budget are weighed in the database, never sent: ``weight`` is an estimate
    from lengths (octet_length, pg_column_size, SQLite's length), which on
    PostgreSQL read no value at all. The first row always comes, and so does the
    row that crosses the budget: the caller's exact budget (page_of) decides
    whether it fits.
    """
    # ROWS: a running sum row by row (the order is unique: ids break ties).
    cursor = await dialect.execute_bulk_read(
        conn,
        f"SELECT * FROM (SELECT page.*, sum(weight) OVER (ORDER BY {order}"
        " ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS running"
        f" FROM ({select}) page ORDER BY {order} LIMIT {int(limit)}) cut"
        f" WHERE running - weight <= {int(byte_budget)} ORDER BY {order}",
        params,
    )
    rows = await cursor.fetchall()
    # Fewer than asked, the last one past the budget: the budget left some out.
    cut = len(rows) < limit and bool(rows) and rows[-1][-1] > byte_budget
    return [row[:-2] for row in rows], cut
