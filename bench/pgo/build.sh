#!/usr/bin/env bash
# A profile-guided build of sluice.
#
# 1. builds sluice instrumented to count what its code does;
# 2. trains it: the load harness's sluice scenarios (recording, policies,
#    an active rollout; answers whole and streamed) on loopback, then
#    `sluice demo`, so the profile covers the serving path and the control
#    loop;
# 3. merges the counts and builds sluice again with them, so the compiler
#    lays out the hot path together and keeps cold code out of its way.
#
#   bench/pgo/build.sh   # prints the binary: target/pgo/use/<host>/release/sluice
#   TARGET=/tmp/pgo bench/pgo/build.sh
#
# Needs the toolchain's llvm-profdata (`rustup component add llvm-tools`)
# and the harness's mock (built here). Nothing leaves the machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
TARGET=${TARGET:-target/pgo}
TARGET=$(mkdir -p "$TARGET" && cd "$TARGET" && pwd)
RATE=${RATE:-2000}

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
    echo "llvm-profdata not found at $profdata: run \`rustup component add llvm-tools\`" >&2
    exit 1
fi

raw="$TARGET/raw"
rm -rf "$raw" "$TARGET/merged.profdata"
mkdir -p "$raw"

cargo build --release -p sluice-bench --bin sluice-load >&2
# With an explicit target, RUSTFLAGS reach sluice's code and not build scripts.
RUSTFLAGS="-Cprofile-generate=$raw" \
    cargo build --release -p sluice --target "$host" --target-dir "$TARGET/gen" >&2

# Training. The harness stops each sluice with SIGTERM, and a sluice that
# exits writes its counts.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
./target/release/sluice-load run --scenarios direct,sluice,sluice-policies,sluice-rollout \
    --rates "$RATE" --modes non-stream,stream --duration 5s --warmup 1s --rounds 1 \
    --sluice-bin "$TARGET/gen/$host/release/sluice" >"$work/train.log" 2>&1 ||
    { cat "$work/train.log" >&2; exit 1; }
(cd "$work" && "$TARGET/gen/$host/release/sluice" demo --no-wait --listen 127.0.0.1:0 >"$work/demo.log" 2>&1) ||
    { cat "$work/demo.log" >&2; exit 1; }

if ! ls "$raw"/*.profraw >/dev/null 2>&1; then
    echo "training wrote no profile under $raw" >&2
    exit 1
fi
"$profdata" merge -o "$TARGET/merged.profdata" "$raw"
RUSTFLAGS="-Cprofile-use=$TARGET/merged.profdata -Cllvm-args=-pgo-warn-missing-function=false" \
    cargo build --release -p sluice --target "$host" --target-dir "$TARGET/use" >&2
out="$TARGET/use/$host/release/sluice"
# The optimised binary runs the demo's whole loop before it is offered.
(cd "$work" && "$out" demo --no-wait --listen 127.0.0.1:0 --requests 400 >"$work/check.log" 2>&1) ||
    { cat "$work/check.log" >&2; exit 1; }
echo "$out"
