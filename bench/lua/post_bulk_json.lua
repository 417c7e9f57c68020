-- POST /events, a JSON array of batch_size events per request.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local bodies, n = nil, 0

function init(args)
  common_init(args)
  bodies = bulk_bodies(",", "[", "]")
end

function request()
  writes = writes + 1
  n = n % #bodies + 1
  return wrk.format("POST", "/events", json_headers, bodies[n])
end
