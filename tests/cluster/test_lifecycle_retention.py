"""tests/contract/test_lifecycle_retention.py on the Redis Cluster (see conftest.py),
every test of it: its restart, lost-memory and older-copy tests reach the session's
keys with tests.helpers.redis_client, a cluster client here."""

from tests.cluster._support import reuse

reuse("tests.contract.test_lifecycle_retention", globals())
