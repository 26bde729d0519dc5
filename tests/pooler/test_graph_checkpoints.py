"""tests/contract/test_graph_checkpoints.py through PgBouncer (see conftest.py).

Left out: the one test of the embedded deployment alone (SQLite's stored JSON), which
here would find PostgreSQL behind the pooler instead."""

from tests.helpers import reuse

reuse(
    "tests.contract.test_graph_checkpoints",
    globals(),
    leave_out={"test_a_retried_put_matches_a_row_stored_with_escapes"},
)
