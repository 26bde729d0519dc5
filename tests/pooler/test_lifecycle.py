"""tests/contract/test_lifecycle.py through PgBouncer (see conftest.py)."""

from tests.helpers import reuse

reuse("tests.contract.test_lifecycle", globals())
