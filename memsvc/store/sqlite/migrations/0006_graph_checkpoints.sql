-- Graph checkpoints (SQLite twin of the PostgreSQL migration). Text compares
-- byte-wise (BINARY) here, as "C" there.
CREATE TABLE graph_threads (
    project_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    update_ms INTEGER NOT NULL,
    ttl_ms INTEGER,
    expire_ms INTEGER,
    keep_last INTEGER NOT NULL DEFAULT 0,
    prune_pending INTEGER NOT NULL DEFAULT 0,
    agent_instance_id TEXT,
    session_id TEXT,
    on_session_end INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (project_id, thread_id)
);
CREATE INDEX graph_threads_expiry ON graph_threads (expire_ms) WHERE expire_ms IS NOT NULL;
CREATE INDEX graph_threads_prune ON graph_threads (project_id, thread_id) WHERE prune_pending;
CREATE INDEX graph_threads_session ON graph_threads (project_id, agent_instance_id, session_id)
    WHERE session_id IS NOT NULL;

CREATE TABLE graph_checkpoints (
    project_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    checkpoint_ns TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    parent_checkpoint_id TEXT,
    checkpoint_type TEXT NOT NULL,
    checkpoint BLOB NOT NULL,
    metadata TEXT NOT NULL,
    channel_versions TEXT NOT NULL,
    run_id TEXT,
    create_time TEXT NOT NULL,
    PRIMARY KEY (project_id, thread_id, checkpoint_ns, checkpoint_id)
);
CREATE INDEX graph_checkpoints_run ON graph_checkpoints (project_id, run_id)
    WHERE run_id IS NOT NULL;

CREATE TABLE graph_values (
    project_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    checkpoint_ns TEXT NOT NULL,
    channel TEXT NOT NULL,
    version TEXT NOT NULL,
    value_type TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (project_id, thread_id, checkpoint_ns, channel, version)
);

CREATE TABLE graph_writes (
    project_id TEXT NOT NULL,
    thread_id TEXT NOT NULL,
    checkpoint_ns TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    task_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    task_path TEXT NOT NULL,
    channel TEXT NOT NULL,
    value_type TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (project_id, thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
);
