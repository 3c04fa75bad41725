-- status: where each of a replica's waiters stands (after its notifications were cut off).
-- KEYS[8..] each waiter's record and outcome
-- ARGV[11..] waiter ids
-- returns one word per id: queued, granted, timeout, cancelled, deadlock, unavailable, gone
return run(function()
  for i = 11, #ARGV do expect(waiter_names, ARGV[i], nil) end
  ask()
  local out = {}
  for i = 11, #ARGV do
    if redis.call('EXISTS', waiter_name(ARGV[i])) == 1 then
      table.insert(out, 'queued')
    else
      local kind = redis.pcall('HGET', outcome_name(ARGV[i]), 'kind')
      if is_error(kind) then kind = false end  -- another type there: no outcome of ours
      table.insert(out, kind or 'gone')
    end
  end
  beat()
  return out
end)
