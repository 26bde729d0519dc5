-- What an episode takes in a response without its embedding, in bytes, as memsvc
-- counts a page's budget (EpisodeRecord.size): ListEpisodes and SearchEpisodes
-- stop a page at its budget inside the database by it. length() counts a text's
-- characters, not its bytes. NULL for the episodes recorded before (and by a
-- memsvc that predates this migration): those are weighed by their lengths.
ALTER TABLE episodes ADD COLUMN response_bytes INTEGER;
