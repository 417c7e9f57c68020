-- GET /products?ids=... with batch_size random products out of n_products (the harness preloads them).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

function init(args)
  common_init(args)
end

function request()
  reads = reads + 1
  local ids = {}
  for k = 1, batch_size do
    ids[k] = product_id(math.random(0, n_products - 1))
  end
  return wrk.format("GET", "/products?ids=" .. table.concat(ids, ","))
end
