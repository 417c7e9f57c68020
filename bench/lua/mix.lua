-- 90% GET /products/{id}, 10% POST /events with one event, random products out of n_products.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

function init(args)
  common_init(args)
end

function request()
  local i = math.random(0, n_products - 1)
  if math.random(1, 10) == 1 then
    writes = writes + 1
    return wrk.format("POST", "/events", json_headers, random_event(i))
  end
  reads = reads + 1
  return wrk.format("GET", "/products/" .. product_id(i))
end
