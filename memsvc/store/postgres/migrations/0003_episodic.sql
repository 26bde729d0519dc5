-- Episodic memory: embeddings, full-text search, the indexes List filters by,
-- and what the purge needs (request answers by scope, event tombstones).

ALTER TABLE episodes
    ADD COLUMN embedding bytea,  -- little-endian float32 values
    ADD COLUMN embedding_dimensions integer NOT NULL DEFAULT 0,
    -- Description and lessons weigh more than the context summary.
    ADD COLUMN search_document tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english', task_description), 'A')
        || setweight(jsonb_to_tsvector('english', lessons_learned, '["string"]'), 'A')
        || setweight(to_tsvector('english', context_summary), 'B')
    ) STORED;

CREATE INDEX episodes_search ON episodes USING gin (search_document);

-- Newest first, ties by id: the List order and its page-token position.
DROP INDEX episodes_newest;
CREATE INDEX episodes_newest ON episodes (project_id, create_time DESC, episode_id DESC);
CREATE INDEX episodes_agent_newest
    ON episodes (project_id, agent_instance_id, create_time DESC, episode_id DESC);

-- The scope a remembered answer belongs to, so a purge can forget it.
ALTER TABLE request_log
    ADD COLUMN agent_instance_id uuid,
    ADD COLUMN session_id text;

-- A purged event keeps its sequence, type and time; its ids and metadata go.
ALTER TABLE lifecycle_events ADD COLUMN purged boolean NOT NULL DEFAULT false;
