-- prune_audit: the audit trail's stream (audit_store.py) pruned by age, and the list of the
-- refusals' ids beside it with it: the stream's entries written before the cutoff go (XTRIM
-- MINID), and so do their ids at the head of the list (oldest first, as the appends pushed
-- them), which would otherwise stay until as many newer refusals pushed them out: the list
-- kept naming entries gone, and each one it named let the stream keep one more of the other
-- entries (append_audit_entry.lua trims the stream to the bound plus the list's length). A
-- list of another type is left to the next append, which drops it. A script of its own, called
-- by EVALSHA, as append_audit_entry.lua.
-- KEYS[1] the audit stream
-- KEYS[2] the list of the refusals' ids (in the stream's slot)
-- ARGV[1] the cutoff, server ms: the stream's ids below it go (every entry written before it)
-- returns {entries removed from the stream, ids taken out of the list}
local cutoff = tonumber(ARGV[1])
local trimmed = redis.call('XTRIM', KEYS[1], 'MINID', ARGV[1])
local taken = 0
if redis.call('TYPE', KEYS[2])['ok'] == 'list' then
  local chunk = 100
  while true do
    local ids = redis.call('LRANGE', KEYS[2], 0, chunk - 1)
    local old = 0
    for _, id in ipairs(ids) do
      -- (an id that does not read as one names no entry of ours: it goes too)
      local ms = tonumber(string.match(id, '^%d+') or '')
      if ms and ms >= cutoff then break end
      old = old + 1
    end
    if old > 0 then redis.call('LTRIM', KEYS[2], old, -1) end
    taken = taken + old
    if old < chunk then break end
  end
end
return {trimmed, taken}
