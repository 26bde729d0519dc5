-- What an episode takes in a response without its embedding, in bytes, as memsvc
-- counts a page's budget (EpisodeRecord.size): ListEpisodes and SearchEpisodes
-- stop a page at its budget inside the database by it, and send no episode past
-- it. The stored sizes could not serve: jsonb's is compressed, a small fraction
-- of what a repetitive action log sends. NULL for the episodes recorded before
-- (and by a memsvc that predates this migration): those are weighed by their
-- stored sizes. Adding a nullable column rewrites nothing.
ALTER TABLE episodes ADD COLUMN response_bytes integer;
