-- A small file on kept-alive connections (bench/soak).
dofile(os.getenv("WRK_REPORT"))
wrk.method = "GET"
wrk.path = "/hello"
done = function(summary, latency, requests) report(summary, latency) end
