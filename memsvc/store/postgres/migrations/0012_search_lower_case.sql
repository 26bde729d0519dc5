-- Search documents in lower case whatever the database's LC_CTYPE. PostgreSQL's
-- text parser lowercases by the ctype, and under C that knows ASCII only: there
-- "Über", "РУССКИЙ" or "CAFÉ" were found by exactly that case and no other. memsvc
-- now lowercases the documents it writes and the query terms it sends
-- (memsvc.domain._episodes.search_case). The documents written before are rebuilt
-- here, on such databases only (nothing changes where the ctype lowercases 'É'),
-- lowercased by ICU's root locale when the server was built with ICU; without it
-- they keep their case (the episodes recorded from now on are found either way).
--
-- Where it rebuilds, the episodes table is rewritten under its lock: on a large one,
-- run `memsvc migrate` when episodes can wait.
DO $$
BEGIN
    IF lower(chr(201)) <> chr(233)
       AND EXISTS (SELECT 1 FROM pg_collation WHERE collname = 'und-x-icu') THEN
        UPDATE episodes
        SET search_document = memsvc_search_document(
            lower(task_description COLLATE "und-x-icu"),
            lower(lessons_learned::text COLLATE "und-x-icu")::jsonb,
            lower(context_summary COLLATE "und-x-icu"));
    END IF;
END $$;
