"""A page read that stops at a byte budget in the database (store/_budgeted_sql.py):
the rows that start within the budget come, and it says it was cut only when the
budget left a row out (a cut at the last row would send the client to an empty
page), on both stores."""

from __future__ import annotations

from typing import Any

import pytest

from memsvc.store._budgeted_sql import read_within_budget
from tests.helpers import durable_store_at, migrated

ROWS = "SELECT column1 AS id, column2 AS weight FROM (VALUES (1, 50), (2, 50), (3, 50)) rows"


@pytest.mark.parametrize(
    ("limit", "budget", "ids", "cut"),
    [
        (10, 1000, [1, 2, 3], False),  # all fit
        (10, 60, [1, 2], True),  # the second crosses, the third is left out
        (10, 120, [1, 2, 3], False),  # the last crosses: nothing is left out
        (10, 10, [1], True),  # the first always comes
        (2, 1000, [1, 2], False),  # the limit ended it, not the budget
    ],
)
async def test_a_budgeted_read_says_it_was_cut_only_when_it_left_rows_out(
    database_url, limit, budget, ids, cut
):
    async def read(conn: Any, dialect: Any) -> tuple[list[Any], bool]:
        return await read_within_budget(conn, dialect, ROWS, [], "id", limit, budget)

    async with migrated(durable_store_at(database_url)) as store:
        rows, was_cut = await store._query(read)
    assert [int(row[0]) for row in rows] == ids
    assert was_cut is cut
