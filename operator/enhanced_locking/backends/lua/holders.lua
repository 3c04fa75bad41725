-- holders: every live holder of a key (one, or several when held shared), changing nothing.
-- KEYS[8..] the key's lock and shared hashes
-- ARGV[11] lock key
-- returns a list of locks
-- decoded by redis_replies.locks
return run(function()
  expect(lock_name, ARGV[11])
  expect(shared_name, ARGV[11])
  return holders(ARGV[11])
end)
