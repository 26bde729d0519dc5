-- What a session's or a checkpoint's metadata takes in a response, in bytes, as
-- memsvc counts a page's budget (SessionRecord.size, CheckpointRecord.size):
-- ListSessions and ListCheckpoints stop a page at its budget inside the database
-- by it, rather than read a page size of rows of large metadata into memsvc to
-- send the few that fit. NULL for the rows written before: those are weighed by a
-- bound from their JSON's length (Dialect.json_wire_bound).
ALTER TABLE sessions ADD COLUMN metadata_bytes INTEGER;
ALTER TABLE checkpoints ADD COLUMN metadata_bytes INTEGER;
