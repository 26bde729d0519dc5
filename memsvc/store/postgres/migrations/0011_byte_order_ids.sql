-- Session and checkpoint ids sort byte-wise (COLLATE "C"), as on SQLite and as the
-- graph tables' ids do (0007): in the database's own collation (en-US, ICU...) two
-- sessions or checkpoints of one millisecond were listed, paged and kept by
-- keep_last in another order than on SQLite, and than the same memsvc on a C database.
-- No table is rewritten; the primary keys and listing indexes that hold these columns
-- are rebuilt, under an exclusive lock on both tables (about 0.1 s per 200,000 rows
-- and index, measured): run it as a `memsvc migrate` Job above some millions of rows.
ALTER TABLE checkpoints
    ALTER COLUMN session_id TYPE text COLLATE "C",
    ALTER COLUMN checkpoint_id TYPE text COLLATE "C";
ALTER TABLE sessions ALTER COLUMN session_id TYPE text COLLATE "C";
