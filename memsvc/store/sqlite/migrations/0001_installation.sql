-- The installation record: one row naming this memsvc deployment's database.
CREATE TABLE memsvc_installation (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    installation_id TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

INSERT INTO memsvc_installation (singleton, installation_id)
VALUES (1, lower(hex(randomblob(16))));
