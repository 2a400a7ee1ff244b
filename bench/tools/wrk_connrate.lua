-- Connection rate: one small request per connection ("Connection: close";
-- wrk opens a new connection after each response).
dofile(os.getenv("WRK_REPORT"))
wrk.method = "GET"
wrk.path = "/hello"
wrk.headers["Connection"] = "close"
done = function(summary, latency, requests) report(summary, latency) end
