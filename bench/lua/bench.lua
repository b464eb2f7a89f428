-- wrk script shared by every jwtproxy benchmark scenario.
--
-- Arguments (after `--`):  TOKENS PATH COUNT_STATUSES [OFFSET]
--   TOKENS          "-" for no Authorization header, "@FILE" for a token list (one per line,
--                   rotated per request: every request carries the next token), "dpop@FILE" for
--                   a DPoP file (line 1 the bound access token, then one single-use proof per
--                   line: every request sends "Authorization: DPoP <token>", the next proof and
--                   Host bench.test; threads take disjoint proofs, none is sent twice unless the
--                   run outlasts the list), or a literal token (sent on every request, as a
--                   static request: wrk's fast path).
--   PATH            request path, e.g. "/", "/open", "/big".
--   COUNT_STATUSES  "1" to count responses per status code (costs wrk CPU: used for the reject
--                   scenario, where "non-2xx" alone cannot tell a 401 from a 502), else "0".
--   OFFSET          where in the token list to start (default 0): the warm-up run starts half a
--                   list away from the measured run, so a proxy's token cache (smaller than the
--                   list) cannot hold what the measured run sends first.
--
-- done() prints one line "BENCHJSON {...}" that bench/run.py parses: requests, duration (us),
-- bytes, latency percentiles (us), socket errors, non-2xx/3xx count and, if asked, statuses.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads - 1)
  -- Every setup() runs before any init(): each thread ends up knowing the final count.
  for _, t in ipairs(threads) do
    t:set("nthreads", #threads)
  end
end

function init(args)
  local tokens = args[1] or "-"
  local path = args[2] or "/"
  count_statuses = (args[3] == "1")
  statuses = {}
  wrk.path = path
  if tokens == "-" then
    -- static request without a token
  elseif string.sub(tokens, 1, 5) == "dpop@" then
    local file = assert(io.open(string.sub(tokens, 6), "r"))
    local token = file:read("*l")
    reqs = {}
    for line in file:lines() do
      if #line > 0 then
        reqs[#reqs + 1] = wrk.format(nil, path, {
          ["Host"] = "bench.test", ["Authorization"] = "DPoP " .. token, ["DPoP"] = line,
        })
      end
    end
    file:close()
    -- Thread k of n sends proofs offset+k, offset+k+n, ...: no two threads share a proof.
    local offset = tonumber(args[4] or "0") or 0
    local stride = nthreads or 1
    idx = offset + (id or 0)
    request = function()
      idx = idx + stride
      return reqs[(idx % #reqs) + 1]
    end
  elseif string.sub(tokens, 1, 1) == "@" then
    -- Pre-format every request once: request() then only returns a prepared string.
    local file = assert(io.open(string.sub(tokens, 2), "r"))
    reqs = {}
    for line in file:lines() do
      if #line > 0 then
        reqs[#reqs + 1] = wrk.format(nil, path, { ["Authorization"] = "Bearer " .. line })
      end
    end
    file:close()
    -- Each thread starts at a different place in the list so threads do not move in lockstep.
    local offset = tonumber(args[4] or "0") or 0
    idx = (offset + (id or 0) * 7919) % #reqs
    request = function()
      idx = idx + 1
      if idx > #reqs then idx = 1 end
      return reqs[idx]
    end
  else
    wrk.headers["Authorization"] = "Bearer " .. tokens
  end
  if count_statuses then
    response = function(status, headers, body)
      statuses[status] = (statuses[status] or 0) + 1
    end
  end
end

local function json_statuses()
  local merged = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses")
    if counts then
      for status, n in pairs(counts) do
        merged[status] = (merged[status] or 0) + n
      end
    end
  end
  local parts = {}
  for status, n in pairs(merged) do
    parts[#parts + 1] = string.format('"%d":%d', status, n)
  end
  return "{" .. table.concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f},' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},"statuses":%s}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean, e.connect, e.read, e.write, e.timeout, e.status, json_statuses()))
end
