-- release-by-pull: free every lock a pull holds and serve each key's queue.
-- KEYS[8..] the pull's index; the keys of the locks in it, and of their waiters, it asks for
-- ARGV[11] repo  ARGV[12] pull number
-- returns {released locks (leases still running), granted, dropped, locks whose lease had run
--   out, every live holder of the freed keys after serving them (the lease timers are set
--   from them)}
-- decoded by redis_replies.release_by_pull
local refused = guard()
if refused then return refused end
-- The pull's own locks on k (its exclusive one, its shared one), lapsed ones too.
local function own(k)
  local found, out = {}, {}
  local holder = read_lock(k)
  if holder then table.insert(found, holder) end
  local field = ARGV[11] .. '#' .. ARGV[12]
  local text = redis.pcall('HGET', shared_name(k), field)
  if text and not is_error(text) then table.insert(found, shared_row(k, field, text)) end
  for _, lock in ipairs(found) do
    if same_owner(lock, ARGV[11], ARGV[12]) then table.insert(out, lock) end
  end
  return out
end

local function main()
  local index = pull_index(ARGV[11], ARGV[12])
  local keys = members(index)
  -- Discovery: the keys of the index, freed first (VIEW), then their queues served.
  for _, k in ipairs(keys) do expect(key_names, k) end
  ask()
  local freeing = {}
  for _, k in ipairs(keys) do
    local mine = own(k)
    for _ = 1, #mine do table.insert(freeing, k) end
    if #mine > 0 then
      local rest = {}
      for _, h in ipairs(holders(k)) do
        if not same_owner(h, ARGV[11], ARGV[12]) then table.insert(rest, h) end
      end
      VIEW[k] = rest
    end
  end
  table.sort(freeing)
  serve(freeing, PLAN)
  planned()
  local released, freed, expired = {}, {}, {}
  for _, k in ipairs(keys) do
    for _, lock in ipairs(own(k)) do
      drop_lock(lock)
      table.insert(freed, k)
      if lapsed(lock) then table.insert(expired, lock) else table.insert(released, lock) end
    end
  end
  w('DEL', index)
  -- Every key is freed first, then each queue is served, in key order (as every backend does).
  table.sort(freed)
  local fx = new_effects()
  serve(freed, fx)
  local left, last = {}, nil
  for _, k in ipairs(freed) do
    if k ~= last then
      for _, h in ipairs(holders(k)) do table.insert(left, h) end
      last = k
    end
  end
  return {released, fx.granted, fx.dropped, expired, left}
end
return run(main, true)
