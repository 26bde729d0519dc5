-- Lifecycle: sessions, durable checkpoints, the event log, remembered request answers
-- and the episodes Terminate records (extended by the episodic issue).

CREATE TABLE sessions (
    project_id uuid NOT NULL,
    agent_instance_id uuid NOT NULL,
    session_id text NOT NULL,
    agent_type_id uuid,
    state smallint NOT NULL CHECK (state IN (1, 2, 3)),  -- SessionState: active, paused, terminated
    metadata jsonb NOT NULL DEFAULT '{}',
    version bigint NOT NULL,
    -- Identifies the working-memory incarnation Redis must hold (ADR 0004).
    memory_epoch text NOT NULL,
    resume_checkpoint_id text,
    create_time timestamptz NOT NULL,
    update_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, agent_instance_id, session_id)
);

CREATE INDEX sessions_newest ON sessions (project_id, create_time DESC, agent_instance_id, session_id);

CREATE TABLE checkpoints (
    project_id uuid NOT NULL,
    agent_instance_id uuid NOT NULL,
    session_id text NOT NULL,
    checkpoint_id text NOT NULL,
    create_time timestamptz NOT NULL,
    key_count bigint NOT NULL,
    size_bytes bigint NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    contents bytea NOT NULL,  -- memsvc/store/_snapshot.py format
    PRIMARY KEY (project_id, agent_instance_id, session_id, checkpoint_id),
    FOREIGN KEY (project_id, agent_instance_id, session_id)
        REFERENCES sessions (project_id, agent_instance_id, session_id) ON DELETE CASCADE
);

CREATE INDEX checkpoints_newest
    ON checkpoints (project_id, agent_instance_id, session_id, create_time DESC, checkpoint_id DESC);

-- Gap-free in commit order: the sequence comes from event_sequence, updated by the
-- writing transaction just before it commits.
CREATE TABLE lifecycle_events (
    sequence bigint PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    event_type smallint NOT NULL,
    project_id uuid NOT NULL,
    agent_instance_id uuid NOT NULL,
    session_id text NOT NULL,
    agent_type_id uuid,
    checkpoint_id text,
    episode_id uuid,
    request_id text,
    metadata jsonb NOT NULL DEFAULT '{}',
    event_time timestamptz NOT NULL
);

CREATE TABLE event_sequence (
    singleton integer PRIMARY KEY CHECK (singleton = 1),
    last_sequence bigint NOT NULL
);

INSERT INTO event_sequence (singleton, last_sequence) VALUES (1, 0);

CREATE TABLE request_log (
    project_id uuid NOT NULL,
    request_id text NOT NULL,
    method text NOT NULL,
    arguments_hash text NOT NULL,
    response bytea,
    create_time timestamptz NOT NULL,
    PRIMARY KEY (project_id, request_id)
);

CREATE INDEX request_log_by_age ON request_log (create_time);

CREATE TABLE episodes (
    episode_id uuid PRIMARY KEY,
    project_id uuid NOT NULL,
    agent_instance_id uuid NOT NULL,
    session_id text NOT NULL,
    task_type text NOT NULL,
    task_description text NOT NULL,
    outcome smallint NOT NULL,
    outcome_details text NOT NULL,
    actions jsonb NOT NULL,
    context_summary text NOT NULL,
    lessons_learned jsonb NOT NULL,
    duration_seconds double precision NOT NULL,
    tokens_used bigint NOT NULL,
    importance double precision NOT NULL,
    metadata jsonb NOT NULL DEFAULT '{}',
    create_time timestamptz NOT NULL
);

CREATE INDEX episodes_newest ON episodes (project_id, create_time DESC, episode_id);
