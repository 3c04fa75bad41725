-- get: the holder of a key (a lapsed lease is not a holder), changing nothing.
-- KEYS[8..] the key's lock and shared hashes
-- ARGV[11] lock key
-- returns the lock or {}
-- decoded by redis_replies.maybe_lock
return run(function()
  expect(lock_name, ARGV[11])
  expect(shared_name, ARGV[11])
  return peek(ARGV[11]) or {}
end)
