-- POST /events, one JSON event per request, random product out of n_products.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

function init(args)
  common_init(args)
end

function request()
  writes = writes + 1
  return wrk.format("POST", "/events", json_headers, random_event(math.random(0, n_products - 1)))
end
