-- The session's marker (GetSession, a refusal's explanation, a heal), read in one
-- atomic step without changing anything: none when Redis evicted the session's
-- keys (purge, which the next script runs, drops what is left).
-- Returns the marker's fields as HGETALL does (empty: no marker).
if evicted(now_ms()) then
  return {}
end
return redis.call('HGETALL', M)
