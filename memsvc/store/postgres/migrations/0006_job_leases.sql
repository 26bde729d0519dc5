-- One replica runs the background jobs (retention, compaction) at a time: the one
-- holding the lease row, renewed on each run and taken over once it expires. A row,
-- not a session advisory lock, so it works through a transaction pooler.
CREATE TABLE job_leases (
    job text PRIMARY KEY,
    holder text NOT NULL,
    expire_time timestamptz NOT NULL
);
