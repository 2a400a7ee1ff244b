-- 64 KiB files: cycle through /small/f0000.bin .. f(N-1).bin on kept-alive connections.
dofile(os.getenv("WRK_REPORT"))
local n = tonumber(os.getenv("WRK_NFILES") or "1000")
local i = 0
request = function()
  i = (i + 1) % n
  return wrk.format("GET", string.format("/small/f%04d.bin", i))
end
done = function(summary, latency, requests) report(summary, latency) end
