-- Many small files (64 KiB unless bench/run --small-size): cycle through
-- /DIR/f0000.bin .. f(N-1).bin on kept-alive connections.
dofile(os.getenv("WRK_REPORT"))
local n = tonumber(os.getenv("WRK_NFILES") or "1000")
local dir = os.getenv("WRK_DIR") or "small"
local i = 0
request = function()
  i = (i + 1) % n
  return wrk.format("GET", string.format("/%s/f%04d.bin", dir, i))
end
done = function(summary, latency, requests) report(summary, latency) end
