-- The installation record: one row naming this memsvc deployment's database.
CREATE TABLE memsvc_installation (
    singleton integer PRIMARY KEY CHECK (singleton = 1),
    installation_id uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now()
);

INSERT INTO memsvc_installation (singleton) VALUES (1);
