-- Episodic memory (SQLite twin of the PostgreSQL migration): embeddings,
-- FTS5 full-text search, the indexes List filters by, and what the purge
-- needs (request answers by scope, event tombstones).

-- Rebuilt with an INTEGER PRIMARY KEY: the full-text index refers to rows by
-- rowid, which VACUUM may renumber unless it is an explicit column.
CREATE TABLE episodes_v3 (
    search_rowid INTEGER PRIMARY KEY,
    episode_id TEXT NOT NULL UNIQUE,
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
    create_time TEXT NOT NULL,
    embedding BLOB,  -- little-endian float32 values
    embedding_dimensions INTEGER NOT NULL DEFAULT 0
);

INSERT INTO episodes_v3 (episode_id, project_id, agent_instance_id, session_id, task_type,
    task_description, outcome, outcome_details, actions, context_summary, lessons_learned,
    duration_seconds, tokens_used, importance, metadata, create_time)
SELECT episode_id, project_id, agent_instance_id, session_id, task_type, task_description,
    outcome, outcome_details, actions, context_summary, lessons_learned, duration_seconds,
    tokens_used, importance, metadata, create_time
FROM episodes ORDER BY create_time;

DROP TABLE episodes;
ALTER TABLE episodes_v3 RENAME TO episodes;

CREATE INDEX episodes_newest ON episodes (project_id, create_time DESC, episode_id DESC);
CREATE INDEX episodes_agent_newest
    ON episodes (project_id, agent_instance_id, create_time DESC, episode_id DESC);

-- Description and lessons weigh more than the context summary (see bm25 weights
-- in memsvc/store/_episodes_sql.py). Kept in step with episodes by triggers.
CREATE VIRTUAL TABLE episodes_fts USING fts5(
    task_description, context_summary, lessons, tokenize = 'porter unicode61'
);

CREATE TRIGGER episodes_fts_insert AFTER INSERT ON episodes BEGIN
    INSERT INTO episodes_fts (rowid, task_description, context_summary, lessons)
    VALUES (new.search_rowid, new.task_description, new.context_summary,
            (SELECT group_concat(value, char(10)) FROM json_each(new.lessons_learned)));
END;

CREATE TRIGGER episodes_fts_delete AFTER DELETE ON episodes BEGIN
    DELETE FROM episodes_fts WHERE rowid = old.search_rowid;
END;

CREATE TRIGGER episodes_fts_update AFTER UPDATE ON episodes BEGIN
    DELETE FROM episodes_fts WHERE rowid = old.search_rowid;
    INSERT INTO episodes_fts (rowid, task_description, context_summary, lessons)
    VALUES (new.search_rowid, new.task_description, new.context_summary,
            (SELECT group_concat(value, char(10)) FROM json_each(new.lessons_learned)));
END;

INSERT INTO episodes_fts (rowid, task_description, context_summary, lessons)
SELECT search_rowid, task_description, context_summary,
       (SELECT group_concat(value, char(10)) FROM json_each(lessons_learned))
FROM episodes;

ALTER TABLE request_log ADD COLUMN agent_instance_id TEXT;
ALTER TABLE request_log ADD COLUMN session_id TEXT;

ALTER TABLE lifecycle_events ADD COLUMN purged INTEGER NOT NULL DEFAULT 0;
