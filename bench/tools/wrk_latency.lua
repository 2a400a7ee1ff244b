-- Latency: 1 KiB request (padded header) and 1 KiB response on kept-alive connections.
dofile(os.getenv("WRK_REPORT"))
wrk.method = "GET"
wrk.path = "/1k.bin"
wrk.headers["X-Pad"] = string.rep("x", 1000)
done = function(summary, latency, requests) report(summary, latency) end
