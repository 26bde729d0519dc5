-- What a session's or a checkpoint's metadata takes in a response, in bytes, as
-- memsvc counts a page's budget (SessionRecord.size, CheckpointRecord.size):
-- ListSessions and ListCheckpoints stop a page at its budget inside the database
-- by it. length() counts a text's characters, not its bytes. NULL for the rows
-- written before (and by a memsvc that predates this migration): those are
-- weighed by their lengths.
ALTER TABLE sessions ADD COLUMN metadata_bytes INTEGER;
ALTER TABLE checkpoints ADD COLUMN metadata_bytes INTEGER;
