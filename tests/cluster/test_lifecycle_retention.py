"""tests/contract/test_lifecycle_retention.py on the Redis Cluster (see conftest.py).

Its restart test deletes the session's keys with a single-node client of the
working-memory URL; test_cluster_store.py has its cluster version.
"""

from tests.cluster._support import reuse

reuse(
    "tests.contract.test_lifecycle_retention",
    globals(),
    leave_out={"test_checkpoints_survive_a_restart_and_lost_memory_is_reported"},
)
