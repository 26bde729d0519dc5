"""tests/contract/test_lifecycle_retention.py on the Redis Cluster (see conftest.py).

Its restart test deletes the session's keys, and its restored-copy test dumps and
restores them, with a single-node client of the working-memory URL; they are left
out (test_cluster_store.py has the restart's cluster version).
"""

from tests.cluster._support import reuse

reuse(
    "tests.contract.test_lifecycle_retention",
    globals(),
    leave_out={
        "test_checkpoints_survive_a_restart_and_lost_memory_is_reported",
        "test_a_store_restored_from_an_older_copy_is_lost_memory",
        "test_a_copy_from_before_the_last_resume_is_lost_memory",
        "test_an_older_copy_with_no_checkpoint_left_can_still_end",
        "test_a_memory_memsvc_did_not_leave_is_not_kept_as_the_final_one",
        "test_resume_replaces_an_older_copy_of_a_paused_memory_of_the_same_size",
        "test_a_lost_memory_is_not_kept_when_the_terminate_is_finished_by_a_heal",
        "test_a_paused_session_whose_memory_was_lost_ends_with_its_checkpoint",
        "test_a_merge_resume_over_a_lost_paused_memory_keeps_the_paused_entries",
        "test_an_older_copy_taken_before_a_spawn_settled_is_lost_memory",
        "test_a_terminate_that_died_before_its_last_step_is_finished_by_its_retry",
        "test_a_paused_copy_of_an_active_session_refuses_writes_as_lost",
        "test_a_paused_copy_of_an_earlier_epoch_refuses_writes_as_lost",
        "test_a_session_redis_evicted_in_part_is_lost_memory",
        "test_a_copy_taken_during_a_pause_of_an_earlier_epoch_is_lost_memory",
        "test_a_session_whose_keys_all_expired_is_intact_and_empty",
        "test_a_merge_resume_over_a_lost_memory_is_refused",
    },
)
