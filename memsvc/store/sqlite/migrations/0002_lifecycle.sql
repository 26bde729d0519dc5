-- Lifecycle (SQLite twin of the PostgreSQL migration; times are UTC ISO-8601 text): sessions, durable checkpoints, the event log, remembered request answers
-- and the episodes Terminate records (extended by the episodic issue).

CREATE TABLE sessions (
    project_id TEXT NOT NULL,
    agent_instance_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    agent_type_id TEXT,
    state INTEGER NOT NULL CHECK (state IN (1, 2, 3)),  -- SessionState: active, paused, terminated
    metadata TEXT NOT NULL DEFAULT '{}',
    version INTEGER NOT NULL,
    -- Identifies the working-memory incarnation Redis must hold (ADR 0004).
    memory_epoch TEXT NOT NULL,
    resume_checkpoint_id TEXT,
    create_time TEXT NOT NULL,
    update_time TEXT NOT NULL,
    PRIMARY KEY (project_id, agent_instance_id, session_id)
);

CREATE INDEX sessions_newest ON sessions (project_id, create_time DESC, agent_instance_id, session_id);

CREATE TABLE checkpoints (
    project_id TEXT NOT NULL,
    agent_instance_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    create_time TEXT NOT NULL,
    key_count INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    contents BLOB NOT NULL,  -- memsvc/store/_snapshot.py format
    PRIMARY KEY (project_id, agent_instance_id, session_id, checkpoint_id),
    FOREIGN KEY (project_id, agent_instance_id, session_id)
        REFERENCES sessions (project_id, agent_instance_id, session_id) ON DELETE CASCADE
);

CREATE INDEX checkpoints_newest
    ON checkpoints (project_id, agent_instance_id, session_id, create_time DESC, checkpoint_id DESC);

-- Gap-free in commit order: the sequence comes from event_sequence, updated by the
-- writing transaction just before it commits.
CREATE TABLE lifecycle_events (
    sequence INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    event_type INTEGER NOT NULL,
    project_id TEXT NOT NULL,
    agent_instance_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    agent_type_id TEXT,
    checkpoint_id TEXT,
    episode_id TEXT,
    request_id TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    event_time TEXT NOT NULL
);

CREATE TABLE event_sequence (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    last_sequence INTEGER NOT NULL
);

INSERT INTO event_sequence (singleton, last_sequence) VALUES (1, 0);

CREATE TABLE request_log (
    project_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    method TEXT NOT NULL,
    arguments_hash TEXT NOT NULL,
    response BLOB,
    create_time TEXT NOT NULL,
    PRIMARY KEY (project_id, request_id)
);

CREATE INDEX request_log_by_age ON request_log (create_time);

CREATE TABLE episodes (
    episode_id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    agent_instance_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    task_type TEXT NOT NULL,
    task_description TEXT NOT NULL,
    outcome INTEGER NOT NULL,
    outcome_details TEXT NOT NULL,
    actions TEXT NOT NULL,
    context_summary TEXT NOT NULL,
    lessons_learned TEXT NOT NULL,
    duration_seconds REAL NOT NULL,
    tokens_used INTEGER NOT NULL,
    importance REAL NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{}',
    create_time TEXT NOT NULL
);

CREATE INDEX episodes_newest ON episodes (project_id, create_time DESC, episode_id);
