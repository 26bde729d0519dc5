"""tests/contract/test_graph_checkpoints.py through PgBouncer (see conftest.py)."""

from tests.helpers import reuse

reuse("tests.contract.test_graph_checkpoints", globals())
