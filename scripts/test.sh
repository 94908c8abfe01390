#!/usr/bin/env bash
# The test command: Rust unit, property and end-to-end tests, then the
# official OpenAI Python SDK against a running gateway. Sets up its own
# Python virtualenv under target/ on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --all-targets

VENV=target/pyenv
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
SLUICE_BIN="$PWD/target/debug/sluice" "$VENV/bin/python" -m pytest -q tests/python
