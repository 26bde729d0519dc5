-- Indexes from which a listing's next page starts at its cursor, for the filters
-- that sessions_newest and the graph checkpoints' primary key do not serve: a
-- page read every earlier row again, so walking a listing took time quadratic in
-- its length (a review: page 150 of one agent's 30,000 sessions read 30,452
-- buffers, 52 ms, once PostgreSQL used the statement's generic plan).
-- ListSessions of one agent instance:
CREATE INDEX sessions_agent_newest
    ON sessions (project_id, agent_instance_id, create_time DESC, session_id DESC);
-- A graph thread's checkpoints across its namespaces (LangGraph's list() of a thread):
CREATE INDEX graph_checkpoints_thread_newest
    ON graph_checkpoints (project_id, thread_id, checkpoint_id DESC, checkpoint_ns DESC);
-- Each is built under a lock that holds writes to its table back while it builds
-- (reads go on): 0.25 s for 230,000 sessions (measured); run it as a `memsvc
-- migrate` Job on a table of millions.
