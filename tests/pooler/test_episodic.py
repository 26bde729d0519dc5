"""tests/contract/test_episodic.py through PgBouncer (see conftest.py)."""

from tests.helpers import reuse

reuse("tests.contract.test_episodic", globals())
