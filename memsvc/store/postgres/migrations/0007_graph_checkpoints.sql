-- Graph checkpoints (GraphCheckpointService, memsvc.langgraph.MemsvcSaver).
-- Ids and names sort byte-wise (COLLATE "C"): "latest" is the greatest
-- checkpoint id, as LangGraph's time-ordered ids intend, whatever the
-- database's locale. Compression stays pglz, PostgreSQL's default: on
-- serialized state (text in msgpack) it stores a third less than lz4
-- (bench/langgraph_saver.py).

-- One row per thread: its retention and session link, and the row every
-- write locks first, so writers, prunes and sweeps of a thread never interleave.
CREATE TABLE graph_threads (
    project_id uuid NOT NULL,
    thread_id text COLLATE "C" NOT NULL,
    -- Unix milliseconds, so the upsert every write makes can compute the
    -- expiry (update_ms + ttl_ms) in SQL that both databases share.
    update_ms bigint NOT NULL,
    ttl_ms bigint,                 -- NULL: no TTL
    expire_ms bigint,              -- update_ms + ttl_ms
    keep_last integer NOT NULL DEFAULT 0,
    prune_pending boolean NOT NULL DEFAULT false,
    agent_instance_id uuid,        -- the linked session, if any
    session_id text,
    on_session_end smallint NOT NULL DEFAULT 0,  -- GraphSessionEndAction
    PRIMARY KEY (project_id, thread_id)
);
CREATE INDEX graph_threads_expiry ON graph_threads (expire_ms) WHERE expire_ms IS NOT NULL;
CREATE INDEX graph_threads_prune ON graph_threads (project_id, thread_id) WHERE prune_pending;
CREATE INDEX graph_threads_session ON graph_threads (project_id, agent_instance_id, session_id)
    WHERE session_id IS NOT NULL;

CREATE TABLE graph_checkpoints (
    project_id uuid NOT NULL,
    thread_id text COLLATE "C" NOT NULL,
    checkpoint_ns text COLLATE "C" NOT NULL,
    checkpoint_id text COLLATE "C" NOT NULL,
    parent_checkpoint_id text,
    checkpoint_type text NOT NULL,
    checkpoint bytea NOT NULL,     -- the client's serialized document, values left out
    metadata jsonb NOT NULL,
    channel_versions jsonb NOT NULL,
    run_id text,                   -- metadata.run_id, for DeleteGraphRuns
    create_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, thread_id, checkpoint_ns, checkpoint_id)
);
CREATE INDEX graph_checkpoints_run ON graph_checkpoints (project_id, run_id)
    WHERE run_id IS NOT NULL;

-- A channel's value at one version, stored once and shared by every checkpoint
-- of the namespace whose channel_versions name it.
CREATE TABLE graph_values (
    project_id uuid NOT NULL,
    thread_id text COLLATE "C" NOT NULL,
    checkpoint_ns text COLLATE "C" NOT NULL,
    channel text COLLATE "C" NOT NULL,
    version text COLLATE "C" NOT NULL,
    value_type text NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (project_id, thread_id, checkpoint_ns, channel, version)
);

CREATE TABLE graph_writes (
    project_id uuid NOT NULL,
    thread_id text COLLATE "C" NOT NULL,
    checkpoint_ns text COLLATE "C" NOT NULL,
    checkpoint_id text COLLATE "C" NOT NULL,
    task_id text COLLATE "C" NOT NULL,
    idx integer NOT NULL,
    task_path text COLLATE "C" NOT NULL,
    channel text NOT NULL,
    value_type text NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (project_id, thread_id, checkpoint_ns, checkpoint_id, task_id, idx)
);
