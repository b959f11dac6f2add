-- wrk script: POST prepared request bodies (real images), rotating over them.
-- args: <folder of N.body files> <count> <content type>. Prints one WRKJSON line at the end.
local bodies = {}
local counter = 0

function init(args)
  for i = 0, tonumber(args[2]) - 1 do
    local f = assert(io.open(args[1] .. "/" .. i .. ".body", "rb"))
    bodies[#bodies + 1] = f:read("*all")
    f:close()
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = args[3]
end

function request()
  counter = counter + 1
  return wrk.format(nil, nil, nil, bodies[(counter % #bodies) + 1])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "errors_connect": %d, "errors_read": %d, ' ..
    '"errors_write": %d, "errors_status": %d, "errors_timeout": %d, "p50_us": %d, "p95_us": %d, ' ..
    '"p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
