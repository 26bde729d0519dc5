-- An index from which a page of one agent instance's sessions (ListSessions with
-- agent_instance_id) starts at its cursor: sessions_newest does not serve that
-- filter, and a page read every earlier session of the agent again, so walking
-- them took time quadratic in their number (a review: page 150 of one agent's
-- 30,000 sessions read 30,452 buffers, 52 ms, once PostgreSQL used the statement's
-- generic plan, which took the primary key and sorted).
-- Built under a lock that holds writes to sessions back while it builds (reads go
-- on): 0.25 s for 230,000 sessions (measured); on a table of millions, run it as a
-- `memsvc migrate` Job. One index per migration: a transaction keeps each lock
-- it takes to its end.
CREATE INDEX sessions_agent_newest
    ON sessions (project_id, agent_instance_id, create_time DESC, session_id DESC);
