-- How many of a checkpoint's keys have a TTL. A Resume from the checkpoint a
-- Pause took reads no contents when this is 0: the paused working memory
-- still holds exactly that checkpoint, unless it was lost (ADR 0004, "A resume
-- that moves nothing"). NULL for checkpoints taken before: always read.
ALTER TABLE checkpoints ADD COLUMN timed_keys bigint;
