"""Sends N chat requests, one after another on one kept-alive connection,
once the gateway answers; exits non-zero unless every answer is a 200."""
import http.client
import json
import sys
import time

port, n = int(sys.argv[1]), int(sys.argv[2])
# The load harness's request (bench/src/load/run.rs).
body = json.dumps({
    "model": "support",
    "messages": [{"role": "user", "content": "Where is my order #1234? It has not arrived yet and I would like to know when it will."}],
    "stream": False,
})
headers = {"Authorization": "Bearer sk-load", "Content-Type": "application/json"}
deadline = time.monotonic() + 120
while True:
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/healthz")
        c.getresponse().read()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("sluice did not start")
        time.sleep(0.5)
failed = 0
for _ in range(n):
    c.request("POST", "/v1/chat/completions", body, headers)
    r = c.getresponse()
    r.read()
    failed += r.status != 200
if failed:
    sys.exit(f"{failed} of {n} requests failed")
