"""tests/contract/test_working_memory_limits.py on the Redis Cluster (see conftest.py)."""

from tests.cluster._support import reuse

reuse("tests.contract.test_working_memory_limits", globals())
