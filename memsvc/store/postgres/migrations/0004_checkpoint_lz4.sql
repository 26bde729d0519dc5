-- Checkpoint contents compressed with lz4 instead of pglz: about 2x less CPU to
-- store and to read a 1,000-key checkpoint (docs/performance.md). Only new
-- values use it; existing ones stay readable. A PostgreSQL built without lz4
-- keeps pglz.
DO $$
BEGIN
    ALTER TABLE checkpoints ALTER COLUMN contents SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available; checkpoints stay compressed with pglz';
END
$$;
