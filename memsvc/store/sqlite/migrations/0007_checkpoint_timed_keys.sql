-- How many of a checkpoint's keys have a TTL (SQLite twin of PostgreSQL's 0008):
-- a Resume from the checkpoint a Pause took reads no contents when it is 0.
ALTER TABLE checkpoints ADD COLUMN timed_keys INTEGER;
