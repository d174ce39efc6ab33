-- wrk script for the bench's nginx run: tallies every answer by status and by 100 ms of
-- wall-clock time (CLOCK_REALTIME, comparable with the bench's time.time() windows), and
-- prints one JSON line prefixed "WRK_JSON " when wrk is done. Socket errors come from wrk's
-- own summary (connect/read/write/timeout/status).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } wrk_timespec;
int clock_gettime(int clk_id, wrk_timespec *tp);
]]
local ts = ffi.new("wrk_timespec")
local function now_bucket()
  ffi.C.clock_gettime(0, ts)
  return tonumber(ts.tv_sec) * 10 + math.floor(tonumber(ts.tv_nsec) / 100000000)
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  buckets = {}
  bad_buckets = {}
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  local b = tostring(now_bucket())
  buckets[b] = (buckets[b] or 0) + 1
  if status < 200 or status > 299 then
    bad_buckets[b] = (bad_buckets[b] or 0) + 1
  end
end

local function merge(into, from)
  for k, v in pairs(from) do into[k] = (into[k] or 0) + v end
end

local function encode(tbl)
  local parts = {}
  for k, v in pairs(tbl) do table.insert(parts, string.format('"%s":%d', k, v)) end
  return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
  local st, bk, bad = {}, {}, {}
  for _, t in ipairs(threads) do
    merge(st, t:get("statuses"))
    merge(bk, t:get("buckets"))
    merge(bad, t:get("bad_buckets"))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},' ..
    '"latency_us":{"p50":%d,"p99":%d,"max":%d,"mean":%.1f},' ..
    '"statuses":%s,"buckets_100ms":%s,"bad_buckets_100ms":%s}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency.max, latency.mean,
    encode(st), encode(bk), encode(bad)))
end
