"""Fixtures: start the real `sluice serve` binary on an ephemeral port."""

import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP_KEY = "sk-python-client"

CONFIG = textwrap.dedent(
    """
    [[api_keys]]
    name = "python"
    key_env = "PY_APP_KEY"

    [providers.sim]
    kind = "simulated"
    seed = 5
    latency = { median_ms = 20, p99_ms = 80 }

    [providers.broken]
    kind = "simulated"
    latency = { median_ms = 5, p99_ms = 10 }
    error_rate = 1.0

    [deployments.support]
    stable = "v1"
    variants.v1 = { provider = "sim", model = "sim-1", system_prompt = "You are a support agent." }

    [deployments.broken]
    stable = "v1"
    variants.v1 = { provider = "broken", model = "sim-broken" }
    """
)


def sluice_bin() -> str:
    path = os.environ.get("SLUICE_BIN", str(ROOT / "target" / "debug" / "sluice"))
    if not Path(path).exists():
        pytest.fail(f"sluice binary not found at {path}: build it first (cargo build)")
    return path


class Server:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.db = str(tmp / "py.db")
        cfg = tmp / "sluice.toml"
        cfg.write_text(CONFIG)
        env = dict(os.environ, PY_APP_KEY=APP_KEY)
        self.proc = subprocess.Popen(
            [sluice_bin(), "serve", "--config", str(cfg), "--listen", "127.0.0.1:0", "--db", self.db],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        first = self.proc.stdout.readline().strip()
        assert first.startswith("sluice listening on "), first
        self.base = first.removeprefix("sluice listening on ")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            pytest.fail("sluice did not stop within 30 s of SIGTERM")
        return self.proc.returncode

    def recorded(self) -> list:
        import json

        out = subprocess.run(
            [sluice_bin(), "requests", "--db", self.db, "--last", "100000", "--json"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture()
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.base}/v1", api_key=APP_KEY, max_retries=0, timeout=30)
