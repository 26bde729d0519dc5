-- Full-text search tokenized as on SQLite: words of letters and digits. memsvc
-- writes each episode's document itself from its text with every other
-- character made a space (memsvc.domain._episodes.search_texts), so "main.py",
-- "3.14" and "alice@example.com" are words as SQLite's FTS5 sees them, not one
-- file, number or e-mail token that no query word matches. English stemming
-- without stop words (FTS5's porter keeps them too), and at most 120,000
-- characters of text per episode: a tsvector holds at most 1 MiB, and valid
-- episodes reach that.
--
-- The episodes table is rewritten under its lock while this runs: on a large
-- one, run `memsvc migrate` when episodes can wait.

CREATE TEXT SEARCH DICTIONARY memsvc_english_stem (TEMPLATE = snowball, Language = english);
CREATE TEXT SEARCH CONFIGURATION memsvc_english (COPY = english);
ALTER TEXT SEARCH CONFIGURATION memsvc_english
    ALTER MAPPING FOR asciiword, asciihword, hword_asciipart, word, hword, hword_part,
                      numword, numhword, hword_numpart
    WITH memsvc_english_stem;

-- The document of an episode, computed here: for the episodes recorded before,
-- and for those a memsvc that predates this migration records (a rolling
-- upgrade, a rollback). Words by PostgreSQL's own character classes, which
-- under a C locale know only ASCII: there every other ASCII character is a
-- separator and the rest of Unicode is letters (as the text parser reads it).
-- The classes are asked, not the locale's name (ICU collations decide them too).
CREATE FUNCTION memsvc_search_document(description text, lessons jsonb, summary text)
RETURNS tsvector LANGUAGE sql STABLE AS $$
    SELECT setweight(to_tsvector('memsvc_english', t.high), 'A')
        || setweight(to_tsvector('memsvc_english', left(t.low, 120000 - length(t.high))), 'B')
    FROM (SELECT left(regexp_replace(description || ' ' || coalesce(
                          (SELECT string_agg(value, ' ') FROM jsonb_array_elements_text(lessons)),
                          ''), w.pattern, ' ', 'g'), 120000) AS high,
                 regexp_replace(summary, w.pattern, ' ', 'g') AS low
          -- Whether the classes know 'é' (chr(233)): a C locale's do not.
          FROM (SELECT CASE WHEN chr(233) ~ '[[:alpha:]]' THEN '[^[:alnum:]]+'
                            ELSE E'[\\x01-/:-@[-`{-\\x7f]+' END
                       AS pattern) w) t
$$;

CREATE FUNCTION memsvc_fill_search_document() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.search_document IS NULL THEN
        NEW.search_document :=
            memsvc_search_document(NEW.task_description, NEW.lessons_learned, NEW.context_summary);
    END IF;
    RETURN NEW;
END $$;

DROP INDEX episodes_search;
ALTER TABLE episodes DROP COLUMN search_document;
ALTER TABLE episodes ADD COLUMN search_document tsvector;
UPDATE episodes
SET search_document = memsvc_search_document(task_description, lessons_learned, context_summary);
CREATE TRIGGER episodes_search_document BEFORE INSERT ON episodes
    FOR EACH ROW EXECUTE FUNCTION memsvc_fill_search_document();
CREATE INDEX episodes_search ON episodes USING gin (search_document);
