-- POST one SQL statement per request: `wrk -s post_sql.lua URL -- "SQL" [ROWS]`.
-- Each `{k}` in the SQL becomes a random integer in [0, ROWS) on every request (a point lookup);
-- without one the same request is sent every time, built once.
local sql, rows, fixed

function init(args)
  sql = args[1] or "SELECT 1"
  rows = tonumber(args[2] or "1")
  math.randomseed(os.time())
end

function request()
  if sql:find("{k}", 1, true) then
    local body = sql:gsub("{k}", tostring(math.random(0, rows - 1)))
    return wrk.format("POST", nil, {["Content-Type"] = "text/plain"}, body)
  end
  if not fixed then
    fixed = wrk.format("POST", nil, {["Content-Type"] = "text/plain"}, sql)
  end
  return fixed
end
