wrk.method = "POST"
wrk.body = "SELECT 1"
wrk.headers["Content-Type"] = "text/plain"
