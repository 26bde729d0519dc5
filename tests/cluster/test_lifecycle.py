"""tests/contract/test_lifecycle.py on the Redis Cluster (see conftest.py)."""

from tests.cluster._support import reuse

reuse("tests.contract.test_lifecycle", globals())
