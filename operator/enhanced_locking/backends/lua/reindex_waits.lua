-- reindex-waits: make every pull's index of waits (`waits_name` in lib.lua) whole from the
-- queues, and trust the indexes up to the enqueue counter as it stands (`waits_trusted`):
-- run when wait_graph_from.lua found them untrusted (an enqueue of a release that keeps none).
-- Each waiter queued is listed in its pull's index; what an index lists besides (a waiter
-- gone) stays, and readers pass over it.
-- KEYS   the seven of lib.lua; the indexes' mark (RedisKeys.by_pull_mark); every queued key's
--        queues, its waiters' records and their pulls' indexes it asks for
-- returns the number of waiters listed
-- decoded by redis_replies.count
local refused = guard()
if refused then return refused end
local function main()
  expect(by_pull_mark)
  local keys = members(QUEUED)
  table.sort(keys)
  for _, k in ipairs(keys) do
    for level = 0, 3 do expect(queue_name, k, level) end
  end
  ask()
  local ids, seen = {}, {}
  for _, k in ipairs(keys) do
    for _, member in ipairs(expect_queued(k)) do
      local id = member_waiter(member)
      if not seen[id] then
        seen[id] = true
        table.insert(ids, id)
      end
    end
  end
  ask()
  local listed = {}
  for _, id in ipairs(ids) do
    local rec = read_waiter(id)
    if rec then
      expect(waits_name, rec.repo, rec.pull)
      table.insert(listed, rec)
    end
  end
  planned()
  for _, rec in ipairs(listed) do
    list_wait(rec.repo, rec.pull, rec.id, tonumber(rec['deadline']) + GRACE_MS)
  end
  local enqueues = PCALL('GET', SEQ)
  if not is_error(enqueues) then keep_waits_mark(enqueues or '0') end
  return #listed
end
return run(main, true)
