-- The shared budget of one provider key, kept by Redis for every replica.
--
-- Every change goes through this one script (atomic; Redis TIME is the only clock), so no
-- replica reads, decides and writes across round trips. All keys of a budget share one
-- hash tag (one Cluster slot). Times are Redis milliseconds.
--
-- KEYS: gen, cfg, log, tot, live, share, demand, seeded, clock, tlog, tcnt, ttot, twait
--   gen     generation id; missing = the state was lost (restart, failover, flush)
--   cfg     the versioned record (hash): configuration, learned limit, retreat, pause, GCRA,
--           token limit, learned token limit, token hold
--   log     zset of grants: member "rid|seq|count", score = grant time
--   tot     hash: "all" and each replica's sum of the counts in `log`
--   live    zset rid -> last heartbeat
--   share   hash rid -> the share (per window) the replica falls back to without Redis,
--           and "rid|t" -> its token share
--   demand  hash rid -> requests offered per window
--   seeded  set of replicas that reported their own recent sends in this generation
--   clock   never set in service: tests set it to run the script on a fake clock
--   tlog    zset of token grants: member "rid|t<seq>" (seeded: "rid|ts<seq>.<i>"),
--           score = grant time
--   tcnt    hash: token grant member -> its count (settlement changes counts, so they
--           are not in the member's name)
--   ttot    hash: "all" and each replica's sum of the counts in `tlog`
--   twait   hash: rid -> "least|since|seen" of a replica whose token lease was refused for
--           want of room: after a window of waiting, the room it needs is held for it
-- ARGV: op, rid, gen_known, version_known, then the op's own arguments.
--
-- Reply (every op, `lost` included): { status, now, gen, version, granted, member,
--   wait_ms, ttl_ms, live, share, learning, limit, rpm, factor, probing, pause_until,
--   pause_reason, reserved, record (flat field/value list when version_known differs,
--   else empty), shares (flat rid/count list when asked, else empty), start_in (ms until
--   a lease may be used), tokens_share (the token limit over the live replicas, 0 without
--   a token budget), tokens_limit_now (the token limit kept now) }
--   A `tlease` reply's granted/member/wait_ms/ttl_ms are about tokens; `share`, `limit`,
--   `reserved` and `shares` are always about requests.

local K_GEN, K_CFG, K_LOG, K_TOT, K_LIVE, K_SHARE, K_DEMAND, K_SEEDED =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_TLOG, K_TCNT, K_TTOT, K_TWAIT = KEYS[10], KEYS[11], KEYS[12], KEYS[13]
local op, rid, gen_known, ver_known = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]) or -1

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fake = redis.call('GET', KEYS[9])
if fake then now = tonumber(fake) end

local HB_TTL = 3000 -- a replica unseen this long is no longer live

local cfg = {}
local dirty = {}
local bumped = false

local function num(v, d)
  v = tonumber(v)
  if v == nil then return d end
  return v
end

local function load_cfg()
  local flat = redis.call('HGETALL', K_CFG)
  if #flat == 0 then return false end
  for i = 1, #flat, 2 do cfg[flat[i]] = flat[i + 1] end
  return true
end

local function set(k, v)
  cfg[k] = tostring(v)
  dirty[k] = true
end

local function bump()
  if not bumped then
    bumped = true
    set('version', num(cfg.version, 0) + 1)
  end
end

local function save()
  local args = {}
  for k, _ in pairs(dirty) do
    args[#args + 1] = k
    args[#args + 1] = cfg[k]
  end
  if #args > 0 then redis.call('HSET', K_CFG, unpack(args)) end
end

local function window() return num(cfg.window_ms, 60000) end
local function margin() return num(cfg.margin_ms, 300) end
-- A lease is used within ttl of its grant, so a grant counts for its ttl plus the window
-- plus the margin: long enough to cover the provider's window around any of its sends.
local function ttl()
  local x = math.floor(window() / 100)
  if x < 20 then x = 20 end
  if x > 2000 then x = 2000 end
  return x
end
local function span() return window() + margin() + ttl() end
-- The lease time of tokens for requests that already wait.
local function short_ttl() return math.min(ttl(), 20) end

local function ceiling()
  local n = math.floor(num(cfg.rate_rpm, 40) * window() / 60000)
  if n < 1 then n = 1 end
  return n
end

local function probing() return num(cfg.probe_until, 0) > now end

-- The per-window limit the cluster keeps to now.
local function limit()
  local c = ceiling()
  local l = num(cfg.learned, 0)
  if probing() or l <= 0 or l >= c then return c end
  return l
end

-- Retreat: the factor after the last cut, recovering by steps after a quiet period.
local function factor()
  local f = num(cfg.cut_factor, 1)
  local cut_at = num(cfg.cut_at, 0)
  if f >= 1 or cut_at == 0 then return 1 end
  local since = now - cut_at - num(cfg.quiet_ms, 30000)
  if since < 0 then return f end
  f = f + (math.floor(since / num(cfg.recovery_ms, 10000)) + 1) * num(cfg.step, 0.1)
  if f > 1 then f = 1 end
  return f
end

-- Requests per minute paced now: the limit spread over the window, times the factor.
local function rpm()
  local rate = num(cfg.rate_rpm, 40)
  local l, c = limit(), ceiling()
  local base = rate
  if l < c then base = math.min(rate, l * 60000 / window()) end
  return base * factor()
end

-- The largest lease: 1% of the window's limit (one token up to 199 a window).
local function lease_max()
  return math.max(1, math.floor(limit() / 100))
end

-- The least worth granting: half a full lease, or all that is wanted.
local function least_of(want)
  return math.min(want, math.max(1, math.floor(lease_max() / 2)))
end

-- The cluster's bucket holds at least one full lease (and two tokens), so leases of
-- that size can be granted and a slot the window guard made skip is caught up; the
-- window guard still bounds every window.
local function burst()
  return math.max(num(cfg.capacity, 1), lease_max(), 2)
end

local function count_of(member)
  return tonumber(string.match(member, '|(%d+)$')) or 0
end
local function rid_of(member)
  return string.match(member, '^(.*)|[^|]*|%d+$') or ''
end

-- Drops grants that left the span, keeping the totals.
local function trim()
  local cutoff = now - span()
  local old = redis.call('ZRANGEBYSCORE', K_LOG, '-inf', cutoff)
  if #old == 0 then return end
  local by = {}
  local all = 0
  for _, m in ipairs(old) do
    local c = count_of(m)
    local r = rid_of(m)
    by[r] = (by[r] or 0) + c
    all = all + c
  end
  redis.call('ZREMRANGEBYSCORE', K_LOG, '-inf', cutoff)
  for r, c in pairs(by) do
    if redis.call('HINCRBY', K_TOT, r, -c) <= 0 then redis.call('HDEL', K_TOT, r) end
  end
  if redis.call('HINCRBY', K_TOT, 'all', -all) < 0 then redis.call('HSET', K_TOT, 'all', 0) end
end

local function add_grant(r, member, score, c)
  redis.call('ZADD', K_LOG, score, member)
  redis.call('HINCRBY', K_TOT, 'all', c)
  redis.call('HINCRBY', K_TOT, r, c)
end

-- Gives back `n` unused tokens of a lease (never sent, so never seen by the provider).
local function give_back(member, n)
  if member == nil or member == '' or n <= 0 then return 0 end
  local score = redis.call('ZSCORE', K_LOG, member)
  if not score then return 0 end
  local c = count_of(member)
  if n > c then n = c end
  local r = rid_of(member)
  redis.call('ZREM', K_LOG, member)
  if c - n > 0 then
    redis.call('ZADD', K_LOG, score, r .. '|' .. string.match(member, '^.*|([^|]*)|%d+$') .. '|' .. (c - n))
  end
  if redis.call('HINCRBY', K_TOT, 'all', -n) < 0 then redis.call('HSET', K_TOT, 'all', 0) end
  if redis.call('HINCRBY', K_TOT, r, -n) <= 0 then redis.call('HDEL', K_TOT, r) end
  -- The bucket gets the tokens back too.
  local per = 60000 / rpm()
  local tat = num(cfg.tat, now) - n * per
  if tat < now then tat = now end
  set('tat', tat)
  return n
end

-- === Tokens: a token grant counts from its grant for a span, like a request grant ===

-- The token limit per window kept now: the learned one while it is lower. 0: no shared
-- token budget (a learned limit alone makes none: nothing configured one).
local function tlimit()
  local c = num(cfg.tokens_limit, 0)
  local l = num(cfg.tokens_learned, 0)
  if l > 0 and l < c then return l end
  return c
end

local function trid_of(member)
  return string.match(member, '^(.*)|t[^|]*$') or ''
end

-- Fields per HMGET/HDEL: unpack's stack holds a few thousand values at most.
local SLICE = 1000

-- Drops token grants that left the span, keeping the totals.
local function ttrim()
  local cutoff = now - span()
  local old = redis.call('ZRANGEBYSCORE', K_TLOG, '-inf', cutoff)
  if #old == 0 then return end
  local by = {}
  local all = 0
  for i = 1, #old, SLICE do
    local j = math.min(i + SLICE - 1, #old)
    local counts = redis.call('HMGET', K_TCNT, unpack(old, i, j))
    for k = 1, j - i + 1 do
      local c = num(counts[k], 0)
      local r = trid_of(old[i + k - 1])
      by[r] = (by[r] or 0) + c
      all = all + c
    end
    redis.call('HDEL', K_TCNT, unpack(old, i, j))
  end
  redis.call('ZREMRANGEBYSCORE', K_TLOG, '-inf', cutoff)
  -- A count at 0 (a lease settled down to nothing) moves nothing: and Redis reads Lua's
  -- "-0" as no integer at all.
  for r, c in pairs(by) do
    if c > 0 and redis.call('HINCRBY', K_TTOT, r, -c) <= 0 then redis.call('HDEL', K_TTOT, r) end
  end
  if all > 0 and redis.call('HINCRBY', K_TTOT, 'all', -all) < 0 then
    redis.call('HSET', K_TTOT, 'all', 0)
  end
end

local function tgrant(r, member, score, c)
  redis.call('ZADD', K_TLOG, score, member)
  redis.call('HSET', K_TCNT, member, c)
  redis.call('HINCRBY', K_TTOT, 'all', c)
  redis.call('HINCRBY', K_TTOT, r, c)
end

-- Moves a token grant's count by `d` (never below 0), keeping the totals; returns the new
-- count. A grant that left the span is not moved (nil): the provider's count of its sends
-- left its window with it.
local function tmove(member, d)
  if member == nil or member == '' then return nil end
  if not redis.call('ZSCORE', K_TLOG, member) then return nil end
  local c = num(redis.call('HGET', K_TCNT, member), 0)
  if c + d < 0 then d = -c end
  if d ~= 0 then
    redis.call('HSET', K_TCNT, member, c + d)
    local r = trid_of(member)
    if redis.call('HINCRBY', K_TTOT, 'all', d) < 0 then redis.call('HSET', K_TTOT, 'all', 0) end
    if redis.call('HINCRBY', K_TTOT, r, d) <= 0 then redis.call('HDEL', K_TTOT, r) end
  end
  return c + d
end

-- Gives back `n` unused tokens of a token lease (never sent, so never counted by the
-- provider); a lease given back whole leaves the log.
local function tgive_back(member, n)
  if n <= 0 then return end
  if tmove(member, -n) == 0 then
    redis.call('ZREM', K_TLOG, member)
    redis.call('HDEL', K_TCNT, member)
  end
end

-- When the oldest grants of the log (all replicas', or `only`'s) that add up to `need`
-- tokens were made: walked oldest first, a page at a time, stopping once enough is found.
-- nil: the log does not hold that many.
local PAGE = 128
local function tfreed_at(need, only)
  local freed, from = 0, 0
  while true do
    local page = redis.call('ZRANGE', K_TLOG, from, from + PAGE - 1, 'WITHSCORES')
    if #page == 0 then return nil end
    local ms = {}
    for i = 1, #page, 2 do ms[#ms + 1] = page[i] end
    local counts = redis.call('HMGET', K_TCNT, unpack(ms))
    for k = 1, #ms do
      if only == nil or trid_of(ms[k]) == only then
        freed = freed + num(counts[k], 0)
        if freed >= need then return num(page[2 * k], now) end
      end
    end
    from = from + PAGE
  end
end

-- Live replicas, and the shares reserved for those that vanished: they may still be
-- sending on their fallback share for `fallback_for_ms`, plus a window for those sends
-- to leave the provider's count.
local function members()
  local gone_before = now - HB_TTL - num(cfg.fallback_for_ms, 120000) - span()
  local dead = redis.call('ZRANGEBYSCORE', K_LIVE, '-inf', gone_before)
  for _, r in ipairs(dead) do
    redis.call('ZREM', K_LIVE, r)
    redis.call('HDEL', K_SHARE, r, r .. '|t')
    redis.call('HDEL', K_DEMAND, r)
    redis.call('SREM', K_SEEDED, r)
  end
  local live = redis.call('ZRANGEBYSCORE', K_LIVE, now - HB_TTL, '+inf')
  local vanished = redis.call('ZRANGEBYSCORE', K_LIVE, '(' .. gone_before, '(' .. (now - HB_TTL))
  local reserved, treserved = 0, 0
  for _, r in ipairs(vanished) do
    local s = redis.call('HMGET', K_SHARE, r, r .. '|t')
    reserved = reserved + num(s[1], 0)
    treserved = treserved + num(s[2], 0)
  end
  return live, reserved, treserved
end

local function end_probe()
  local until_ = num(cfg.probe_until, 0)
  if until_ > 0 and until_ <= now then
    -- Ended without a 429: the busiest span of the probe is proven safe.
    local peak = num(cfg.probe_peak, 0)
    local learned = num(cfg.learned, 0)
    if learned > 0 and peak > learned then
      if peak >= ceiling() then set('learned', 0) else set('learned', peak) end
      set('source', 'probe')
      set('changes', num(cfg.changes, 0) + 1)
      bump()
    end
    set('probe_until', 0)
    set('probe_peak', 0)
  end
end

local function pause(until_, reason)
  if until_ > num(cfg.pause_until, 0) then
    set('pause_until', math.floor(until_))
    set('pause_reason', reason)
  end
end

local live_n, share_n, reserved_n, learning_n, treserved_n = 0, 0, 0, 0, 0
local function refresh_members()
  local live, reserved, treserved = members()
  live_n = #live
  reserved_n = reserved
  treserved_n = treserved
  local n = live_n
  if n < 1 then n = 1 end
  share_n = math.floor(limit() / n)
  learning_n = (now < num(cfg.learning_until, 0)) and 1 or 0
  return live
end

local function flat_cfg()
  if num(cfg.version, 0) == ver_known then return {} end
  local out = {}
  for k, v in pairs(cfg) do
    out[#out + 1] = k
    out[#out + 1] = v
  end
  return out
end

-- Per window: this replica's part of the token limit (what it records as its share).
local function tshare() return math.floor(tlimit() / math.max(live_n, 1)) end

local start_in = 0
local lease_ttl = nil
local function reply(status, gen, granted, member, wait, shares)
  save()
  return { status, now, gen or '', num(cfg.version, 0), granted or 0, member or '',
    math.floor(wait or 0), lease_ttl or ttl(), live_n, share_n, learning_n, limit(),
    tostring(rpm()), tostring(factor()), probing() and 1 or 0, num(cfg.pause_until, 0),
    cfg.pause_reason or '', reserved_n, flat_cfg(), shares or {}, start_in, tshare(), tlimit() }
end

-- === join: create the record (or read it), start a generation if the state was lost ===
if op == 'join' then
  local gen = redis.call('GET', K_GEN)
  local new_gen = false
  if not gen then
    -- Whatever is left of an old generation cannot be trusted: start empty.
    redis.call('DEL', K_LOG, K_TOT, K_SEEDED, K_TLOG, K_TCNT, K_TTOT, K_TWAIT)
    gen = tostring(now)
    redis.call('SET', K_GEN, gen)
    new_gen = true
  end
  local created = 0
  if not load_cfg() then
    for i = 5, #ARGV - 1, 2 do set(ARGV[i], ARGV[i + 1]) end
    set('version', 1)
    set('next_probe', now + num(cfg.probe_interval_ms, 600000))
    created = 1
    new_gen = true
  end
  if new_gen then
    -- One window of learning mode: each replica reports its own recent sends before it
    -- gets a lease, and none takes more than its share until the window has passed. The
    -- bucket starts empty: a missing key must never read as a full bucket.
    set('learning_until', now + span())
    local per = 60000 / rpm()
    set('tat', now + burst() * per)
    set('probe_until', 0)
  end
  redis.call('ZADD', K_LIVE, now, rid)
  refresh_members()
  local r = reply(created == 1 and 'created' or 'joined', gen, 0, '', 0, {})
  r[19] = flat_cfg()
  if #r[19] == 0 then
    ver_known = -1
    r[19] = flat_cfg()
  end
  return r
end

-- Every other op needs the generation the replica knows.
local gen = redis.call('GET', K_GEN)
if not gen or not load_cfg() then
  return { 'lost', now, '', 0, 0, '', 0, 20, 0, 0, 0, 0, '0', '1', 0, 0, '', 0, {}, {}, 0, 0, 0 }
end
if gen ~= gen_known and op ~= 'seed' and op ~= 'leave' then
  refresh_members()
  return reply('gen', gen, 0, '', 0, {})
end

if op == 'seed' then
  -- ARGV[5] = the generation seeded, then (age_ms, count) pairs: this replica's own sends
  -- still in the span, from its local send log; then, optionally, the literal `tokens` and
  -- (age_ms, tokens) pairs: the tokens those sends counted.
  if ARGV[5] ~= gen then
    refresh_members()
    return reply('gen', gen, 0, '', 0, {})
  end
  trim()
  ttrim()
  local seq = redis.call('HINCRBY', K_CFG, 'seq', 1)
  local tokens = false
  local i = 6
  while i <= #ARGV do
    if ARGV[i] == 'tokens' and not tokens then
      tokens = true
      i = i + 1
    else
      local age, c = num(ARGV[i], 0), math.floor(num(ARGV[i + 1], 0))
      if c > 0 and tokens then
        tgrant(rid, rid .. '|ts' .. seq .. '.' .. i, now - age, c)
      elseif c > 0 then
        add_grant(rid, rid .. '|s' .. seq .. '.' .. i .. '|' .. c, now - age, c)
      end
      i = i + 2
    end
  end
  redis.call('SADD', K_SEEDED, rid)
  redis.call('ZADD', K_LIVE, now, rid)
  refresh_members()
  return reply('seeded', gen, 0, '', 0, {})
end

if op == 'leave' then
  give_back(ARGV[5], num(ARGV[6], 0))
  redis.call('ZREM', K_LIVE, rid)
  redis.call('HDEL', K_SHARE, rid, rid .. '|t')
  redis.call('HDEL', K_DEMAND, rid)
  redis.call('HDEL', K_TWAIT, rid)
  refresh_members()
  return reply('left', gen, 0, '', 0, {})
end

if op == 'lease' then
  -- ARGV: 5 want, 6 demand (offered per window), 7 requests waiting, 8 member to give back,
  -- 9 how many, 10 live replicas this replica last knew, 11 want the shares (0/1), then
  -- the times (Redis ms) of sends made after their lease's time
  local want = math.floor(num(ARGV[5], 0))
  local demand = num(ARGV[6], 0)
  local queued = math.floor(num(ARGV[7], 0))
  local waiting = queued > 0
  redis.call('ZADD', K_LIVE, now, rid)
  redis.call('HSET', K_DEMAND, rid, tostring(demand))
  trim()
  give_back(ARGV[8], num(ARGV[9], 0))
  for i = 12, #ARGV do
    -- A request granted in time but written after its lease's time (a busy machine):
    -- its grant may leave the log before the provider stops counting it, so it is
    -- counted again from its send.
    local at = math.floor(num(ARGV[i], 0))
    if at > now - span() then
      local seq = redis.call('HINCRBY', K_CFG, 'seq', 1)
      add_grant(rid, rid .. '|l' .. seq .. '|1', math.min(at, now), 1)
    end
  end
  end_probe()
  local live = refresh_members()
  redis.call('HSET', K_SHARE, rid, share_n)
  local learned = num(cfg.learned, 0)
  if waiting and learned > 0 and learned < ceiling() and not probing()
      and now >= num(cfg.next_probe, 0) and now >= num(cfg.last_429, 0) + window()
      and num(cfg.pause_until, 0) <= now then
    -- Requests wait for the learned limit: try the ceiling for one window, once per
    -- probe interval for the whole cluster.
    set('probe_until', now + window() + margin())
    set('probe_peak', 0)
    set('next_probe', now + num(cfg.probe_interval_ms, 600000))
    bump()
  end
  local granted, member, wait = 0, '', 0
  lease_ttl = ttl()
  local pause_until = num(cfg.pause_until, 0)
  if want > 0 then
    local seeded = redis.call('SISMEMBER', K_SEEDED, rid) == 1
    if pause_until > now then
      wait = pause_until - now
    elseif learning_n == 1 and not seeded then
      refresh_members()
      return reply('seed', gen, 0, '', 0, {})
    else
      local lim = limit()
      local total = num(redis.call('HGET', K_TOT, 'all'), 0)
      local mine = num(redis.call('HGET', K_TOT, rid), 0)
      local room = lim - reserved_n - total
      local g = math.min(want, room)
      -- Shares follow offered load: a replica takes at most its demand's part of the
      -- limit while others want some too (demand: requests offered per window).
      local sum = 0
      for _, r in ipairs(live) do sum = sum + num(redis.call('HGET', K_DEMAND, r), 0) end
      local fair = want
      local recent_bound = false
      -- Only while the window is nearly full: before that the bucket binds, and leases
      -- sized to each replica's rate already follow offered load.
      if #live > 1 and sum > 0 and demand > 0 and total + want > 0.9 * lim then
        fair = math.ceil(lim * demand / sum) - mine
      end
      if learning_n == 1 then
        local n = math.max(#live, num(ARGV[10], 1), 1)
        fair = math.min(fair, math.floor(lim / n) - mine)
      end
      local per = 60000 / rpm()
      local cap = burst()
      local tat = math.max(num(cfg.tat, now), now)
      -- A lease may be scheduled up to `ahead` from now: the bucket's tokens for it are
      -- taken at once, and the replica uses them from `start`. Replicas that want tokens
      -- at the same time get consecutive slots instead of polling for single tokens.
      local ahead = ttl()
      -- While the bucket is what binds (it cannot give what is wanted now), a replica
      -- takes at most its demand's part of what the bucket gave over the last second.
      if #live > 1 and sum > 0 and demand > 0 and tat + want * per - cap * per > now then
        local recent = 0
        for _, m in ipairs(redis.call('ZRANGEBYSCORE', K_LOG, now - 1000, '+inf')) do
          if rid_of(m) == rid then recent = recent + count_of(m) end
        end
        local part = math.ceil((1000 + ahead) / per * demand / sum)
        local left = math.max(part, least_of(want)) - recent
        if left < fair then
          fair = left
          recent_bound = true
        end
      end
      if fair < g then g = fair end
      local avail = math.floor((now + ahead - tat + cap * per) / per)
      local least = least_of(want)
      if avail < least then avail = 0 end
      if avail < g then g = avail end
      if g > 0 then
        local start = math.max(now, math.floor(tat + g * per - cap * per + 0.999))
        local seq = redis.call('HINCRBY', K_CFG, 'seq', 1)
        member = rid .. '|' .. seq .. '|' .. g
        -- Tokens for requests already waiting go out at once: such a lease is usable
        -- for a short time only, and counts that much less (its score is moved back).
        if g <= queued then lease_ttl = short_ttl() end
        add_grant(rid, member, start - (ttl() - lease_ttl), g)
        tat = tat + g * per
        set('tat', tat)
        granted = g
        start_in = start - now
        if probing() and total + g > num(cfg.probe_peak, 0) then set('probe_peak', total + g) end
      else
        g = 0
      end
      if granted < want then
        -- When asking again can be granted: the bucket's next lease, a grant leaving
        -- the window, or this replica's part freeing up, whichever binds.
        if avail <= g then wait = math.max(wait, tat + least * per - cap * per - now - ahead) end
        if recent_bound and fair <= g then
          -- Back when the bucket has made a lease for the others.
          wait = math.max(wait, least_of(want) * per)
        elseif room <= g or fair <= g then
          local oldest = redis.call('ZRANGE', K_LOG, 0, 0, 'WITHSCORES')
          if #oldest == 2 then wait = math.max(wait, num(oldest[2], now) + span() - now) end
        end
        if wait < 1 then wait = 1 end
      end
    end
  end
  local shares = {}
  if ARGV[11] == '1' then shares = redis.call('HGETALL', K_TOT) end
  return reply('ok', gen, granted, member, wait, shares)
end

if op == 'tlease' then
  -- ARGV: 5 want (tokens), 6 least (the smallest useful grant: the cost of the request
  -- waiting first), 7 token member to give back, 8 how many, 9 live replicas this replica
  -- last knew, then (member, signed delta) pairs: settlement's corrections of granted
  -- counts to what the provider counted.
  local want = math.floor(num(ARGV[5], 0))
  local least = math.max(1, math.min(math.floor(num(ARGV[6], 1)), want))
  redis.call('ZADD', K_LIVE, now, rid)
  ttrim()
  tgive_back(ARGV[7], math.floor(num(ARGV[8], 0)))
  for i = 10, #ARGV - 1, 2 do
    local d = math.floor(num(ARGV[i + 1], 0))
    local late = tonumber(string.match(ARGV[i], '^%+(%d+)$') or '')
    if late ~= nil then
      -- "+<ms>": tokens sent after their lease time, counted again from `ms` (the send),
      -- so they stay in the log while the provider counts them.
      if d > 0 and late > now - span() then
        local seq = redis.call('HINCRBY', K_CFG, 'seq', 1)
        tgrant(rid, rid .. '|tx' .. seq, math.min(late, now), d)
      end
    elseif d ~= 0 then
      tmove(ARGV[i], d)
    end
  end
  refresh_members()
  local lim = tlimit()
  -- What this replica may still be sending alone if it vanishes, reserved by the others.
  if lim > 0 then
    redis.call('HSET', K_SHARE, rid .. '|t', tshare())
  else
    redis.call('HDEL', K_SHARE, rid .. '|t')
  end
  if want <= 0 then return reply('ok', gen, 0, '', 0, {}) end
  -- No shared token budget: nothing to grant (nor to seed or hold); ask again in a window,
  -- when the configuration may have given one.
  if lim <= 0 then return reply('ok', gen, 0, '', window(), {}) end
  local hold = num(cfg.tokens_hold_until, 0)
  if hold > now then return reply('ok', gen, 0, '', hold - now, {}) end
  if learning_n == 1 and redis.call('SISMEMBER', K_SEEDED, rid) == 0 then
    return reply('seed', gen, 0, '', 0, {})
  end
  -- A request that costs more than a whole window's limit is never granted here.
  if lim < least then return reply('ok', gen, 0, '', window(), {}) end
  local total = num(redis.call('HGET', K_TTOT, 'all'), 0)
  local mine = num(redis.call('HGET', K_TTOT, rid), 0)
  local room = lim - total - treserved_n
  -- No starvation across replicas, as within one: a replica refused for want of room
  -- leaves a claim; once a claim has waited a window, the room it needs is held for it
  -- against every replica whose own claim is younger (or that has none). Claims not
  -- asked again within two heartbeats are dropped.
  local my_since = nil
  local claims = redis.call('HGETALL', K_TWAIT)
  local parsed = {}
  for i = 1, #claims, 2 do
    local l, since, seen = string.match(claims[i + 1], '^(%d+)|(%d+)|(%d+)$')
    l, since, seen = tonumber(l), tonumber(since), tonumber(seen)
    if l == nil or now - seen > 2 * 1000 then
      redis.call('HDEL', K_TWAIT, claims[i])
    elseif claims[i] == rid then
      my_since = since
    else
      parsed[#parsed + 1] = { l, since }
    end
  end
  local held = 0
  for _, c in ipairs(parsed) do
    if now - c[2] >= window() and (my_since == nil or c[2] < my_since) then held = held + c[1] end
  end
  room = room - held
  local g = math.min(want, room)
  local cap = nil
  if learning_n == 1 then
    cap = math.floor(lim / math.max(live_n, num(ARGV[9], 1), 1)) - mine
  end
  -- While other replicas wait for room, one that holds its equal part of the limit over
  -- the span takes no more (what one does not want, the others may take), so the first
  -- to ask once room frees does not take it all; one below its part may take up to it,
  -- or its head's whole cost.
  if #parsed > 0 then
    local part = math.floor(lim / (#parsed + 1))
    local fair = 0
    if mine < part then fair = math.max(part - mine, least) end
    if cap == nil or fair < cap then cap = fair end
  end
  if cap ~= nil and cap < g then g = cap end
  if g < least and room < least then
    redis.call('HSET', K_TWAIT, rid, least .. '|' .. (my_since or now) .. '|' .. now)
  end
  if g < least then
    -- Less than the request at the head needs: nothing (a part would only sit in the pot).
    -- Back when enough of the log has left the span, or (while learning, or held to its
    -- part) this replica's own grants have or learning mode ends, whichever binds.
    local wait = 0
    if room < least then
      local at = tfreed_at(least - room)
      -- The log cannot free enough: vanished replicas' reserves bind; ask in a window.
      wait = at and (at + span() - now) or window()
    end
    if cap ~= nil and cap < least then
      local w = nil
      if learning_n == 1 then w = num(cfg.learning_until, now) - now end
      local at = tfreed_at(least - cap, rid)
      if at and (w == nil or at + span() - now < w) then w = at + span() - now end
      wait = math.max(wait, w or window())
    end
    return reply('ok', gen, 0, '', math.max(wait, 1), {})
  end
  local seq = redis.call('HINCRBY', K_CFG, 'seq', 1)
  local member = rid .. '|t' .. seq
  -- Usable at once: the request's tokens are the provider's count, not a pace.
  tgrant(rid, member, now, g)
  if my_since ~= nil then redis.call('HDEL', K_TWAIT, rid) end
  return reply('ok', gen, g, member, 0, {})
end

if op == 'refused' then
  -- ARGV: 5 kind (rate | retreat | quota | header | tokens | theader), 6 sent_at (Redis
  -- ms) or the stated per-window limit (requests for header, tokens for tokens/theader;
  -- -1: none stated), 7 retry_after_ms (-1: none) or the quota's reset or the token hold
  local kind = ARGV[5]
  local a = num(ARGV[6], now)
  local retry = num(ARGV[7], -1)
  trim()
  end_probe()
  if kind == 'rate' then
    -- The provider refused the k-th send of its window: it allows k - 1.
    local k = 0
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', K_LOG, '(' .. (a - window()), a)) do
      k = k + count_of(m)
    end
    -- A send made before this generation (reported after Redis lost the state), or
    -- one the log does not hold, teaches nothing: only the pause applies.
    if k < 1 or a < num(gen, 0) then k = ceiling() + 2 end
    local new = math.max(1, k - 1)
    local learned = num(cfg.learned, 0)
    local base = (learned > 0) and learned or ceiling()
    if probing() then
      set('probe_until', 0)
      set('probe_peak', 0)
      bump()
    end
    if new < base then
      set('learned', new)
      set('source', 'learned_429')
      set('changes', num(cfg.changes, 0) + 1)
      bump()
    end
    set('last_429', now)
    if retry < 0 then retry = num(cfg.default_pause_ms, 1000) end
    pause(now + retry, 'retry_after')
  elseif kind == 'retreat' then
    local cut_at = num(cfg.cut_at, 0)
    if cut_at == 0 or now - cut_at >= math.floor(window() / 60) then
      local f = factor() * num(cfg.retreat_factor, 0.5)
      local floor_ = num(cfg.retreat_floor, 0.1)
      if f < floor_ then f = floor_ end
      set('cut_factor', f)
      set('cut_at', now)
      bump()
    end
    if retry < 0 then retry = num(cfg.default_pause_ms, 1000) end
    pause(now + retry, 'overload')
  elseif kind == 'quota' then
    pause(now + math.max(retry, 0), 'quota')
  elseif kind == 'header' then
    local l = math.floor(a)
    if l >= 1 and l ~= num(cfg.learned, 0) then
      set('learned', l)
      set('source', 'header')
      set('changes', num(cfg.changes, 0) + 1)
      bump()
    end
  elseif kind == 'tokens' or kind == 'theader' then
    -- The provider's token limit: learned as stated (a token 429 is not counted back from
    -- the log like a request 429: settlement already keeps the log to the provider's
    -- counts). Requests' limit, pause and retreat stay as they are.
    local l = math.floor(num(ARGV[6], -1))
    if l >= 1 and l ~= num(cfg.tokens_learned, 0) then
      set('tokens_learned', l)
      set('tokens_source', kind == 'tokens' and 'tokens_429' or 'header')
      set('changes', num(cfg.changes, 0) + 1)
      bump()
    end
    if kind == 'tokens' then
      -- Token leases wait out the hold; requests that cost no tokens do not.
      if retry < 0 then retry = num(cfg.default_pause_ms, 1000) end
      local until_ = math.floor(now + retry)
      if until_ > num(cfg.tokens_hold_until, 0) then
        set('tokens_hold_until', until_)
        bump()
      end
    end
  end
  refresh_members()
  return reply('ok', gen, 0, '', 0, {})
end

if op == 'configure' then
  -- ARGV: field/value pairs (rate_rpm, capacity, fallback, tokens_limit, tokens_per_minute:
  -- the setting as given, for replicas to show and adopt; tokens_limit is its window's).
  for i = 5, #ARGV - 1, 2 do
    local f = ARGV[i]
    if f == 'rate_rpm' or f == 'capacity' or f == 'fallback' then set(f, ARGV[i + 1]) end
    if f == 'tokens_limit' or f == 'tokens_per_minute' then
      set(f, math.max(0, math.floor(num(ARGV[i + 1], 0))))
    end
  end
  bump()
  refresh_members()
  return reply('ok', gen, 0, '', 0, {})
end

if op == 'forget' then
  set('learned', 0)
  set('source', 'config')
  set('tokens_learned', 0)
  set('tokens_source', 'config')
  set('probe_until', 0)
  set('probe_peak', 0)
  set('changes', num(cfg.changes, 0) + 1)
  bump()
  refresh_members()
  return reply('ok', gen, 0, '', 0, {})
end

return redis.error_reply('ERR unknown budget op ' .. tostring(op))
