-- Shared by the bench scripts: product ids, counters, and a machine-readable summary line.
-- Script arguments (after `--` on the wrk command line): [1] number of products, [2] events per bulk request.
n_products = 10000
batch_size = 1000
writes = 0
reads = 0
json_headers = {["Content-Type"] = "application/json"}
ndjson_headers = {["Content-Type"] = "application/x-ndjson"}

local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

function common_init(args)
  if args[1] then n_products = tonumber(args[1]) end
  if args[2] then batch_size = tonumber(args[2]) end
  math.randomseed(os.time() * 100 + (id or 0))
end

function product_id(i)
  return string.format("p%05d", i)
end

function random_event(i)
  return string.format('{"product_id":"%s","price":%d.%02d,"stock":%d}',
    product_id(i), math.random(1, 999), math.random(0, 99), math.random(0, 1000))
end

function bulk_bodies(sep, open, close)
  -- A few pre-built bodies, each covering batch_size consecutive products, so the send loop builds nothing.
  local bodies = {}
  local start = ((id or 1) - 1) * batch_size
  for b = 1, 10 do
    local items = {}
    for k = 0, batch_size - 1 do
      items[#items + 1] = random_event((start + (b - 1) * batch_size + k) % n_products)
    end
    bodies[b] = open .. table.concat(items, sep) .. close
  end
  return bodies
end

function done(summary, latency, requests)
  local w, r = 0, 0
  for _, t in ipairs(threads) do
    w = w + (t:get("writes") or 0)
    r = r + (t:get("reads") or 0)
  end
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"writes":%d,"reads":%d,"status_errors":%d,' ..
    '"socket_errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, w, r, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
