-- The session's marker (GetSession, a refusal's explanation, a heal), read in one
-- atomic step without changing anything: none when Redis evicted part of the
-- session (purge, which the next script runs, drops the rest and the marker).
-- Returns the marker's fields as HGETALL does (empty: no marker).
if evicted(redis.call('EXISTS', D), redis.call('EXISTS', K)) then
  return {}
end
return redis.call('HGETALL', M)
