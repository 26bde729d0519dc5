-- An index from which a page of a LangGraph thread's checkpoints across its
-- namespaces (LangGraph's list() of a thread) starts at its cursor: the primary key
-- orders a thread by namespace first, so each page sorted the whole thread (a
-- review: 42-58 ms a page at 100,000 checkpoints).
-- Built under a lock that holds LangGraph puts back while it builds (reads go on);
-- on a table of millions, run it as a `memsvc migrate` Job.
CREATE INDEX graph_checkpoints_thread_newest
    ON graph_checkpoints (project_id, thread_id, checkpoint_id DESC, checkpoint_ns DESC);
