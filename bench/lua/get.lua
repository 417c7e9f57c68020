-- GET /products/{id}, random product out of n_products (the harness preloads them).
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

function init(args)
  common_init(args)
end

function request()
  reads = reads + 1
  return wrk.format("GET", "/products/" .. product_id(math.random(0, n_products - 1)))
end
