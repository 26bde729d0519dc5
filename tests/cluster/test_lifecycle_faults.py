"""tests/contract/test_lifecycle_faults.py on the Redis Cluster (see conftest.py)."""

from tests.cluster._support import reuse

reuse("tests.contract.test_lifecycle_faults", globals())
