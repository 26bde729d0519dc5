-- What a session's or a checkpoint's metadata takes in a response, in bytes, as
-- memsvc counts a page's budget (SessionRecord.size, CheckpointRecord.size):
-- ListSessions and ListCheckpoints stop a page at its budget inside the database
-- by it, rather than read a page size of rows of large metadata into memsvc to
-- send the few that fit. jsonb's stored size could not serve: it is compressed, a
-- small fraction of what repetitive metadata sends. Adding a nullable column
-- rewrites nothing.
ALTER TABLE sessions ADD COLUMN metadata_bytes integer;
ALTER TABLE checkpoints ADD COLUMN metadata_bytes integer;

-- The same count, of any JSON value, made in the database (memsvc's wire_size in
-- memsvc/domain/_pagination.py): what weighs the rows whose metadata_bytes is NULL,
-- written before this migration or by a replica of an older memsvc during a
-- rolling upgrade, and the episodes recorded before 0010's response_bytes. A
-- string is 6 bytes and its UTF-8, any other scalar 9; an array or object 6, each
-- element 6 more, each member 18 and its key's UTF-8 more. About 30 µs for a
-- small object: paid only by those rows, on each page that reads them.
CREATE FUNCTION memsvc_wire_size(value jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT sum(CASE jsonb_typeof(node)
        WHEN 'string' THEN 6 + octet_length(node #>> '{}')
        WHEN 'array' THEN 6 + 6 * jsonb_array_length(node)
        WHEN 'object' THEN 6 + (SELECT coalesce(sum(18 + octet_length(member)), 0)
                                FROM jsonb_object_keys(node) AS member)
        ELSE 9 END)
    FROM jsonb_path_query(value, 'strict $.**') AS node
$$;
