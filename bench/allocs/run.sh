#!/usr/bin/env bash
# Heap allocations per request on sluice's request path, by call site.
#
# Builds sluice with the system allocator (mimalloc hides its calls from
# malloc tracers), serves the load harness's mock upstream and the
# `sluice-policies` configuration on loopback, and runs sluice under
# valgrind's DHAT twice: once for FEW requests and once for MANY, over one
# kept-alive connection. The difference between the two runs, divided by
# MANY - FEW, is what each request costs; start-up and shut-down cancel out.
#
#   bench/allocs/run.sh            # 200 and 1 200 requests
#   FEW=100 MANY=2100 bench/allocs/run.sh
#
# Needs valgrind (`apt-get install -y valgrind`) and python3.
set -euo pipefail
cd "$(dirname "$0")/../.."
FEW=${FEW:-200}
MANY=${MANY:-1200}
TARGET=${TARGET:-target/allocs}
OUT=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$OUT"' EXIT

cargo build --release -p sluice --features system-allocator --target-dir "$TARGET" >&2
cargo build --release -p sluice-bench --bin sluice-load >&2

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK=$(port)
SLUICE=$(port)
./target/release/sluice-load mock --listen "127.0.0.1:$MOCK" >"$OUT/mock.log" 2>&1 &
KEY=$(printf sk-load | sha256sum | cut -d' ' -f1)
sed -e "s/@SLUICE@/$SLUICE/" -e "s/@MOCK@/$MOCK/" -e "s/@KEY@/$KEY/" -e "s#@DB@#$OUT/sluice.db#" \
    bench/allocs/sluice.toml >"$OUT/sluice.toml"

for n in "$FEW" "$MANY"; do
    rm -f "$OUT"/sluice.db*
    valgrind --tool=dhat --dhat-out-file="$OUT/dhat.$n.json" \
        "$TARGET/release/sluice" serve --config "$OUT/sluice.toml" >"$OUT/sluice.$n.log" 2>&1 &
    pid=$!
    python3 bench/allocs/client.py "$SLUICE" "$n"
    kill -TERM "$pid"
    wait "$pid" || true
done
python3 bench/allocs/sites.py "$OUT/dhat.$FEW.json" "$OUT/dhat.$MANY.json" $((MANY - FEW))
