-- Lifecycle step 3 (ADR 0004), after the database committed: only if the marker
-- still belongs to operation `op`, make the working memory match the commit.
-- KEYS[5..7]: staging D', X', K'.
-- ARGV: op, final_state ('' = remove the marker: terminated), swap_staging
-- ('0'|'1'), clear ('0'|'1').
-- Returns {'ok'} or {'lost', state_or_missing} when another operation owns it.
local SD, SX, SK = KEYS[5], KEYS[6], KEYS[7]
if redis.call('HGET', M, 'op') ~= ARGV[1] then
  return {'lost', redis.call('HGET', M, 'state') or 'missing'}
end
-- UNLINK: Redis frees a large replaced hash in its background thread.
if ARGV[3] == '1' then
  redis.call('UNLINK', D, X, K)
  if redis.call('EXISTS', SD) == 1 then
    redis.call('RENAME', SD, D)
    redis.call('RENAME', SK, K)
  end
  if redis.call('EXISTS', SX) == 1 then
    redis.call('RENAME', SX, X)
  end
  redis.call('HSET', M, 'bytes', redis.call('HGET', M, 'staged_bytes') or '0')
end
if ARGV[4] == '1' then
  redis.call('UNLINK', D, X, K, SD, SX, SK)
  redis.call('HSET', M, 'bytes', 0)
end
if ARGV[2] == '' then
  redis.call('DEL', M)
  return {'ok'}
end
local epoch = redis.call('HGET', M, 'next_epoch')
if epoch then
  redis.call('HSET', M, 'epoch', epoch)
end
settle_marker(ARGV[2], ARGV[1])
return {'ok'}
