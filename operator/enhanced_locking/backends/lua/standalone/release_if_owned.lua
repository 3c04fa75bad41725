-- release_if_owned: Atlantis's UnlockIfOwnedByPull, also checking the repository (the
-- Atlantis-layout store, atlantis_redis.py). A script of its own, called by EVALSHA: it works
-- on a Redis an Atlantis shares, where the enhanced store's function library need not be loaded.
-- KEYS[1] pr/{lockKey}
-- ARGV[1] owner repository full name  ARGV[2] owner pull number
-- returns {0} free, {1, json} released, {2, json} held by another pull (kept), {3, json} the
-- stored value is not JSON we can read (kept): not a JSON object, or one whose Project or Pull
-- is not an object. As codec.py reads the value: a Project or Pull that is null or missing is
-- an empty one, a Pull without Num is pull 0, a Pull whose Num is null is not a lock (cjson.null
-- is truthy: read as a number it was another pull's, where the codec cannot read it).
local current = redis.call('GET', KEYS[1])
if not current then
  return {0}
end
local ok, lock = pcall(cjson.decode, current)
if not ok or type(lock) ~= 'table' then
  return {3, current}
end
local function object(v)
  if v == nil or v == cjson.null then return {} end
  return v
end
local project, pull = object(lock['Project']), object(lock['Pull'])
if type(project) ~= 'table' or type(pull) ~= 'table' or pull['Num'] == cjson.null then
  return {3, current}
end
if project['RepoFullName'] ~= ARGV[1] or tonumber(pull['Num'] or 0) ~= tonumber(ARGV[2]) then
  return {2, current}
end
redis.call('DEL', KEYS[1])
return {1, current}
