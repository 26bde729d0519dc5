-- Full-text search tokenized as on SQLite: words of letters and digits. The
-- document is built by memsvc from its text with every other character made a
-- space (memsvc.domain._episodes.search_words), so "main.py", "3.14" and
-- "alice@example.com" are words as SQLite's FTS5 sees them, not one file, number
-- or e-mail token that no query word matches. English stemming without stop
-- words (FTS5's porter keeps them too), and at most 120,000 characters of text
-- per episode: a tsvector holds at most 1 MiB, and valid episodes reach that.

CREATE TEXT SEARCH DICTIONARY memsvc_english_stem (TEMPLATE = snowball, Language = english);
CREATE TEXT SEARCH CONFIGURATION memsvc_english (COPY = english);
ALTER TEXT SEARCH CONFIGURATION memsvc_english
    ALTER MAPPING FOR asciiword, asciihword, hword_asciipart, word, hword, hword_part,
                      numword, numhword, hword_numpart
    WITH memsvc_english_stem;

DROP INDEX episodes_search;
ALTER TABLE episodes DROP COLUMN search_document;
-- Written by each insert (description and lessons weigh A, the summary B).
ALTER TABLE episodes ADD COLUMN search_document tsvector;

-- Episodes recorded before: the same words, by PostgreSQL's own classes. Under a
-- C locale those know only ASCII letters, so the text is indexed as it is there.
DO $$
DECLARE
    words text := CASE WHEN current_setting('lc_ctype') IN ('C', 'POSIX')
                       THEN '[\s]+' ELSE '[^[:alnum:]]+' END;
BEGIN
    UPDATE episodes e SET search_document =
        setweight(to_tsvector('memsvc_english', t.a), 'A')
        || setweight(to_tsvector('memsvc_english', left(t.b, 120000 - length(t.a))), 'B')
    FROM (
        SELECT episode_id,
               left(regexp_replace(task_description || ' ' || coalesce(
                   (SELECT string_agg(value, ' ') FROM jsonb_array_elements_text(lessons_learned)),
                   ''), words, ' ', 'g'), 120000) AS a,
               regexp_replace(context_summary, words, ' ', 'g') AS b
        FROM episodes
    ) t
    WHERE e.episode_id = t.episode_id;
END $$;

CREATE INDEX episodes_search ON episodes USING gin (search_document);
