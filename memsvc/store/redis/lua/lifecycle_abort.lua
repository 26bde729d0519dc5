-- Undo a lifecycle step 1 whose database transaction did not commit (ADR 0004):
-- only if the marker still belongs to operation `op`, drop the staging keys and
-- put the marker back in the state it had; an aborted Spawn removes everything.
-- A resume that kept the memory ('kept') renamed it into staging: renamed back.
-- KEYS[5..7]: staging D', X', K'.
-- ARGV: op. Returns {'ok', restored_state} or {'lost', state_or_missing}.
if redis.call('HGET', M, 'op') ~= ARGV[1] then
  return {'lost', redis.call('HGET', M, 'state') or 'missing'}
end
if redis.call('HGET', M, 'kept') == '1' then
  for i, live in ipairs({D, X, K}) do
    if redis.call('EXISTS', KEYS[4 + i]) == 1 then
      redis.call('RENAME', KEYS[4 + i], live)
    end
  end
  -- A script that ran meanwhile found no live data and reset the byte count.
  redis.call('HSET', M, 'bytes', redis.call('HGET', M, 'staged_bytes') or '0')
end
redis.call('DEL', KEYS[5], KEYS[6], KEYS[7])
local state = redis.call('HGET', M, 'state')
local prior = redis.call('HGET', M, 'prior')
if state == 'spawning' or prior == 'missing' or not prior then
  redis.call('DEL', D, X, K, M)
  return {'ok', 'missing'}
end
settle_marker(prior, ARGV[1])
return {'ok', prior}
