-- wait-graph-from: the part of the wait-for graph a search from one pull can reach, in one
-- snapshot: every key a reached pull waits on (its index of waits, `waits_name`), with the
-- key's holders and every waiter on it, whose pulls are reached in turn. A step of the walk
-- meets names the call did not declare (a pull's index, its waiters' records, their keys'
-- queues): it asks for them (lib.lua: `run`), a step a call.
-- A key's index by pull names the pulls of its waiters before their records are read, so
-- their indexes of waits (and its holders') are asked for in the same step as the records.
-- A walk that meets more queue entries than its bound stops before it asks for their names:
-- the whole graph (wait_graph.lua) is then read instead, which costs less than walking most
-- of it a step a call.
-- KEYS   the seven of lib.lua; the indexes' mark (RedisKeys.by_pull_mark), the start's index
--        of waits (RedisKeys.waits); what it finds while it runs it asks for
-- ARGV[11] the start's repo  ARGV[12] its pull  ARGV[13] the bound: queue entries met
-- returns {'untrusted'} when the indexes of waits may miss a waiter (an enqueue of a release
--         that keeps none came since they were made whole: reindex_waits.lua); {'whole'} when
--         the walk met more than its bound; else as wait_graph.lua, only the keys reached
-- decoded by redis_replies.wait_graph_from
local function main()
  expect(by_pull_mark)
  ask()
  if not waits_trusted() then return {'untrusted'} end
  local reached, frontier = {}, {}
  local function reach(repo, pull)
    local owner = repo .. '#' .. pull
    if not reached[owner] then
      reached[owner] = true
      table.insert(frontier, {repo, pull})
    end
  end
  reach(ARGV[11], ARGV[12])
  local keys_seen, seen, entries, records = {}, {}, {}, {}
  local bound, met = tonumber(ARGV[13]), 0
  while #frontier > 0 do
    local pulls = frontier
    frontier = {}
    for _, p in ipairs(pulls) do expect(waits_name, p[1], p[2]) end
    ask()
    local ids = {}
    for _, p in ipairs(pulls) do
      local listed = PCALL('SMEMBERS', waits_name(p[1], p[2]))
      if is_error(listed) then return {'untrusted'} end  -- another type: made again
      for _, id in ipairs(listed) do
        if seen[id] == nil then expect(waiter_name, id) end  -- (else met on a key read)
        table.insert(ids, id)
      end
    end
    ask()
    local keys = {}
    for _, id in ipairs(ids) do
      local rec = seen[id]  -- (its other keys, of a batch, are still to be read)
      if rec == nil then rec = read_waiter(id) end  -- (none: gone since it was listed)
      for _, k in ipairs(rec and rec.keys or {}) do
        if not keys_seen[k] then
          keys_seen[k] = true
          table.insert(keys, k)
          expect(lock_name, k)
          expect(shared_name, k)
          expect(by_pull_name, k)
          for level = 0, 3 do expect(queue_name, k, level) end
        end
      end
    end
    ask()
    local entries_of = {}
    for _, k in ipairs(keys) do
      entries_of[k] = expect_queued(k)
      met = met + #entries_of[k]
      if met > bound then return {'whole'} end
      -- The pulls the key's index by pull names (`pull_waiters`): their indexes of waits are
      -- asked for with the records, a step early. Only names: who waits is read from the
      -- records, so an index that is not whole costs a step, never an answer.
      local listed = PCALL('ZRANGE', by_pull_name(k), 0, -1)
      for _, entry in ipairs(is_error(listed) and {} or listed) do
        local repo, pull = string.match(entry, '^(.*)#([^#\n]*)\n')
        if repo then expect(waits_name, repo, pull) end
      end
      for _, h in ipairs(holders(k)) do
        if not h.bad then expect(waits_name, h[6], h[7]) end
      end
    end
    ask()
    for _, k in ipairs(keys) do
      local waiting = graph_waiters(entries_of[k], seen, records)
      for _, id in ipairs(waiting) do reach(seen[id].repo, seen[id].pull) end
      if #waiting > 0 then table.insert(entries, graph_entry(k, waiting, reach)) end
    end
  end
  return {NOW, entries, records}
end
return run(main)
