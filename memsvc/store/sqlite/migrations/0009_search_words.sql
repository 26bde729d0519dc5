-- Full-text search sees memsvc's words, as PostgreSQL's does since its 0009: FTS5
-- indexes each column's text with every character that is not part of a word (a
-- letter or a digit) made a space, by memsvc.domain._episodes.search_words, which
-- every memsvc connection has as the SQL function memsvc_search_words. FTS5's own
-- tokenizer took characters such as ½, ², ① and private-use ones for parts of
-- words, where PostgreSQL's parser splits on them, so one query found other
-- episodes on each database. From now on only memsvc writes episodes (these
-- triggers call its function). The index is rebuilt here, whatever its size.

DROP TRIGGER episodes_fts_insert;
DROP TRIGGER episodes_fts_update;

CREATE TRIGGER episodes_fts_insert AFTER INSERT ON episodes BEGIN
    INSERT INTO episodes_fts (rowid, task_description, context_summary, lessons)
    VALUES (new.search_rowid, memsvc_search_words(new.task_description),
            memsvc_search_words(new.context_summary),
            memsvc_search_words(
                (SELECT group_concat(value, char(10)) FROM json_each(new.lessons_learned))));
END;

CREATE TRIGGER episodes_fts_update AFTER UPDATE ON episodes BEGIN
    DELETE FROM episodes_fts WHERE rowid = old.search_rowid;
    INSERT INTO episodes_fts (rowid, task_description, context_summary, lessons)
    VALUES (new.search_rowid, memsvc_search_words(new.task_description),
            memsvc_search_words(new.context_summary),
            memsvc_search_words(
                (SELECT group_concat(value, char(10)) FROM json_each(new.lessons_learned))));
END;

DELETE FROM episodes_fts;

INSERT INTO episodes_fts (rowid, task_description, context_summary, lessons)
SELECT search_rowid, memsvc_search_words(task_description),
       memsvc_search_words(context_summary),
       memsvc_search_words(
           (SELECT group_concat(value, char(10)) FROM json_each(lessons_learned)))
FROM episodes;
