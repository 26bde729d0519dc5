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
