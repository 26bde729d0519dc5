-- Retention finds expired checkpoints by age: an index instead of a scan of the
-- whole table on every sweep (docs/scaling.md).
CREATE INDEX checkpoints_by_age ON checkpoints (create_time);
