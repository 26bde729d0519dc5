-- One replica runs the background jobs (retention, compaction) at a time (see the
-- PostgreSQL twin).
CREATE TABLE job_leases (
    job TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expire_time TEXT NOT NULL
);
