-- What a session's or a checkpoint's metadata takes in a response, in bytes, as
-- memsvc counts a page's budget (SessionRecord.size, CheckpointRecord.size):
-- ListSessions and ListCheckpoints stop a page at its budget inside the database
-- by it, rather than read a page size of rows of large metadata into memsvc to
-- send the few that fit. jsonb's stored size could not serve: it is compressed, a
-- small fraction of what repetitive metadata sends. Adding a nullable column
-- rewrites nothing.
ALTER TABLE sessions ADD COLUMN metadata_bytes integer;
ALTER TABLE checkpoints ADD COLUMN metadata_bytes integer;

