//! Bounded fuzzing of the parsers that see hostile input: the chat request
//! parser (client bodies), the SSE decoder (upstream streams), the config
//! loader and the probe-suite loader. Each target runs a fixed number of
//! generated cases (arbitrary bytes plus mutations of valid inputs, so the
//! deep paths are reached, not only the first syntax check) and asserts no
//! panic and, for every rejected input, an error with a message.
//!
//! Case counts are set per target below; `SLUICE_FUZZ_CASES` multiplies
//! them for a longer run. Measured sizes and times are in docs/reliability.md.

use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestRunner};
use sluice_core::chat::ChatRequest;
use sluice_core::sse::SseDecoder;
use sluice_core::Config;

fn runner(cases: u32) -> TestRunner {
    let scale: u32 = std::env::var("SLUICE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    TestRunner::new(PtConfig {
        cases: cases.saturating_mul(scale.max(1)),
        failure_persistence: None,
        ..PtConfig::default()
    })
}

const REQUEST: &str = r#"{"model":"support","messages":[{"role":"system","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]},{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c","content":"ok"}],"stream":true,"stream_options":{"include_usage":true},"temperature":0.5,"max_tokens":10,"tools":[{"type":"function","function":{"name":"f","parameters":{}}}],"user":"u","metadata":{"k":"v"}}"#;

const CONFIG: &str = r#"
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:8081"
max_in_flight = 100
[store]
path = "x.db"
log_bodies = "redacted"
on_backpressure = "spill"
[[api_keys]]
name = "app"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[[admin_tokens]]
name = "ops"
role = "operator"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
[providers.sim]
kind = "simulated"
retry = { attempts = 2, backoff = "10ms" }
breaker = { failure_rate = 0.5, min_requests = 5 }
[deployments.support]
stable = "v1"
fallbacks = ["v3"]
variants.v1 = { provider = "sim", model = "m1" }
variants.v2 = { provider = "sim", model = "m2" }
variants.v3 = { provider = "sim", model = "m3" }
[rollouts.r]
deployment = "support"
candidate = "v2"
stages = [{ kind = "percent", percent = 5 }, { kind = "shadow", sample = 0.5 }]
[[rollouts.r.gates]]
signal = "error_rate"
max_regression = 0.05
"#;

/// Replaces, deletes or inserts bytes of `seed` at the given positions.
fn mutate(seed: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for &(pos, op, byte) in edits {
        if out.is_empty() {
            out.push(byte);
            continue;
        }
        let at = pos % out.len();
        match op % 3 {
            0 => out[at] = byte,
            1 => {
                out.remove(at);
            }
            _ => out.insert(at, byte),
        }
    }
    out
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..8)
}

#[test]
fn request_parser() {
    let mut r = runner(10_000);
    r.run(&proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
        if let Err(e) = ChatRequest::parse(&bytes) {
            prop_assert!(!e.message.is_empty());
        }
        Ok(())
    })
    .expect("arbitrary bytes");
    let mut r = runner(10_000);
    r.run(&edits(), |ed| {
        let bytes = mutate(REQUEST.as_bytes(), &ed);
        if let Err(e) = ChatRequest::parse(&bytes) {
            prop_assert!(!e.message.is_empty());
        }
        Ok(())
    })
    .expect("mutated requests");
}

#[test]
fn sse_decoder() {
    let mut r = runner(10_000);
    let chunks = proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..8);
    r.run(&chunks, |chunks| {
        let mut d = SseDecoder::new(256);
        for c in &chunks {
            if let Err(e) = d.feed(c) {
                prop_assert!(!e.to_string().is_empty());
                return Ok(());
            }
        }
        if let Err(e) = d.finish() {
            prop_assert!(!e.to_string().is_empty());
        }
        Ok(())
    })
    .expect("arbitrary streams");
    let stream = "event: message\ndata: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\nid: 1\nretry: 10\ndata: [DONE]\n\n";
    let mut r = runner(10_000);
    r.run(&(edits(), any::<usize>()), |(ed, split)| {
        let bytes = mutate(stream.as_bytes(), &ed);
        let at = split % (bytes.len() + 1);
        let mut d = SseDecoder::new(256);
        let a = d.feed(&bytes[..at]);
        let b = a.and_then(|_| d.feed(&bytes[at..]));
        let c = b.and_then(|_| d.finish().map(|_| ()));
        if let Err(e) = c {
            prop_assert!(!e.to_string().is_empty());
        }
        Ok(())
    })
    .expect("mutated streams");
}

#[test]
fn config_loader() {
    Config::parse(CONFIG).expect("the fuzz seed config is valid");
    let mut r = runner(4000);
    r.run(&"\\PC{0,300}", |text| {
        if let Err(e) = Config::parse(&text) {
            prop_assert!(e.0.iter().all(|e| !e.message.is_empty()));
        }
        Ok(())
    })
    .expect("arbitrary text");
    let mut r = runner(4000);
    r.run(&edits(), |ed| {
        let bytes = mutate(CONFIG.as_bytes(), &ed);
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = Config::parse(&text) {
            prop_assert!(!e.0.is_empty());
            prop_assert!(e.0.iter().all(|e| !e.message.is_empty()));
        }
        Ok(())
    })
    .expect("mutated configs");
}

#[test]
fn probe_suite_loader() {
    let seed = "{\"id\":\"a\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],\"tags\":[\"t\"],\"assert\":[{\"type\":\"icontains\",\"value\":\"x\"}]}\n\
                {\"id\":\"b\",\"messages\":[{\"role\":\"user\",\"content\":\"q\"}],\"assert\":[{\"type\":\"regex\",\"value\":\"^a\"}],\"repeat\":3,\"pass_share\":0.5}\n";
    sluice_core::probe::Suite::parse("seed", seed.as_bytes())
        .expect("the fuzz seed suite is valid");
    let mut r = runner(4000);
    r.run(&edits(), |ed| {
        let bytes = mutate(seed.as_bytes(), &ed);
        if let Err(e) = sluice_core::probe::Suite::parse("fuzz", &bytes) {
            prop_assert!(!e.to_string().is_empty());
        }
        Ok(())
    })
    .expect("mutated suites");
}
