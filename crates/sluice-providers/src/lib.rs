//! Upstream clients for sluice.
//!
//! Every provider takes an OpenAI-shaped [`ChatRequest`] (already rewritten for
//! the variant: upstream model, system prompt, default parameters) and returns
//! OpenAI-shaped output: a `chat.completion` object, or a stream of
//! `chat.completion.chunk` objects. Translation to and from other wire
//! protocols (Anthropic's Messages API) happens entirely in here.
//!
//! - [`openai`]: any OpenAI-compatible upstream;
//! - [`anthropic`]: Anthropic's Messages API, both directions, streams included;
//! - [`simulated`]: a deterministic, network-free model for demos and tests.
//!
//! What this crate is not: it knows nothing of deployments, rollouts, policies
//! or recording. It depends only on `sluice-core`.

pub mod anthropic;
mod h1;
mod http;
pub mod openai;
mod raw;
pub mod simulated;

pub use http::use_thread_pool;
pub use raw::{RawCompletion, Reply};

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde_json::Value;
use sluice_core::chat::{ChatRequest, Usage};
use sluice_core::config::{ProviderConfig, ProviderKind};

/// `fut` within `limit`, with the timer armed only if its first poll does
/// not finish it (a body already received costs no timer). The limit then
/// counts from that first poll.
pub async fn within<F: std::future::Future>(
    limit: Duration,
    fut: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let mut fut = std::pin::pin!(fut);
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
    match first {
        std::task::Poll::Ready(v) => Ok(v),
        std::task::Poll::Pending => tokio::time::timeout(limit, fut).await,
    }
}

/// A body gathered piece by piece under a size limit. A body that arrives
/// in one piece (the usual small one) is kept as it came, without a copy;
/// later pieces are joined into one buffer.
#[derive(Debug, Default)]
pub struct Gathered {
    first: Option<Bytes>,
    rest: Vec<u8>,
}

impl Gathered {
    /// Adds `piece`, unless the body would then be longer than `limit`
    /// bytes: then nothing is added and `false` returned.
    pub fn push(&mut self, piece: Bytes, limit: usize) -> bool {
        let held = self.first.as_ref().map_or(0, Bytes::len) + self.rest.len();
        if held + piece.len() > limit {
            return false;
        }
        match self.first.take() {
            None if self.rest.is_empty() => self.first = Some(piece),
            None => self.rest.extend_from_slice(&piece),
            Some(f) => {
                self.rest.reserve(f.len() + piece.len());
                self.rest.extend_from_slice(&f);
                self.rest.extend_from_slice(&piece);
            }
        }
        true
    }

    /// The whole body.
    pub fn into_bytes(self) -> Bytes {
        self.first.unwrap_or_else(|| Bytes::from(self.rest))
    }
}

/// Why an upstream call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// No connection could be made, or it dropped before a response.
    #[error("cannot reach upstream {provider}: {message}")]
    Unreachable {
        /// Provider name.
        provider: String,
        /// Cause.
        message: String,
        /// Whether the connection was never established (so the request
        /// certainly never reached the upstream: safe to retry).
        connect: bool,
    },
    /// The provider's circuit breaker is open: recent calls failed too often,
    /// so calls are refused without trying until it probes again.
    #[error("upstream {provider} is failing and its circuit breaker is open; retry in {retry_after_s} s")]
    CircuitOpen {
        /// Provider name.
        provider: String,
        /// Seconds until the breaker lets probes through.
        retry_after_s: u64,
    },
    /// The upstream did not answer in time.
    #[error("upstream {provider} timed out after {after:?} ({phase})")]
    Timeout {
        /// Provider name.
        provider: String,
        /// The limit that was hit.
        after: Duration,
        /// Which wait timed out: `response`, `response body`, `first byte`,
        /// `between chunks`, `whole stream`.
        phase: &'static str,
    },
    /// The upstream answered with an error status.
    #[error("upstream {provider} returned HTTP {status}: {message}")]
    Status {
        /// Provider name.
        provider: String,
        /// HTTP status from upstream.
        status: u16,
        /// The upstream's error message.
        message: String,
        /// `Retry-After` seconds, when given.
        retry_after: Option<u64>,
    },
    /// The upstream's answer could not be understood.
    #[error("upstream {provider} sent an invalid response: {message}")]
    InvalidResponse {
        /// Provider name.
        provider: String,
        /// What was wrong.
        message: String,
    },
    /// A stream broke off or carried an error event.
    #[error("upstream {provider} stream failed: {message}")]
    Stream {
        /// Provider name.
        provider: String,
        /// What happened.
        message: String,
    },
    /// The request cannot be expressed for this provider.
    #[error("{message}")]
    Unsupported {
        /// The parameter at fault.
        param: String,
        /// Why.
        message: String,
    },
}

impl ProviderError {
    /// Redacts credentials from the text an upstream (or its transport)
    /// put in this error. An upstream's error message can echo what it was
    /// sent or its own configuration; such text goes to the client, the
    /// store and the log, past the output principles, so no key, token or
    /// private key in it may survive.
    pub fn scrub_secrets(mut self) -> Self {
        match &mut self {
            ProviderError::Unreachable { message, .. }
            | ProviderError::Status { message, .. }
            | ProviderError::InvalidResponse { message, .. }
            | ProviderError::Stream { message, .. } => {
                if let Some(clean) = sluice_core::policy::redact_secrets(message) {
                    *message = clean;
                }
            }
            ProviderError::CircuitOpen { .. }
            | ProviderError::Timeout { .. }
            | ProviderError::Unsupported { .. } => {}
        }
        self
    }

    /// Stable, machine-readable kind recorded with the request.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::Unreachable { .. } => "upstream_unreachable",
            ProviderError::CircuitOpen { .. } => "upstream_circuit_open",
            ProviderError::Timeout { .. } => "upstream_timeout",
            ProviderError::Status { .. } => "upstream_error",
            ProviderError::InvalidResponse { .. } => "upstream_invalid_response",
            ProviderError::Stream { .. } => "upstream_stream_error",
            ProviderError::Unsupported { .. } => "invalid_request",
        }
    }
}

/// A finished, non-streamed completion in OpenAI's shape.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The `chat.completion` object.
    pub body: Value,
    /// The upstream's bytes, when they can be sent to the client unchanged.
    pub raw: Option<Bytes>,
    /// Token usage, if reported.
    pub usage: Option<Usage>,
}

impl Completion {
    /// Wraps a completion object built in-process.
    pub fn from_value(body: Value) -> Self {
        let usage = Usage::from_json(&body);
        Completion {
            body,
            raw: None,
            usage,
        }
    }
}

/// One streamed chunk in OpenAI's shape.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The `chat.completion.chunk` object.
    pub value: Value,
    /// The upstream's `data:` text, when it can be forwarded unchanged.
    pub raw: Option<String>,
}

/// A stream of chunks; it ends after the last chunk (no `[DONE]` item).
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, ProviderError>> + Send>>;

/// Unix seconds now, for the `created` field of translated responses.
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a provider could not be built from its config.
#[derive(Debug, thiserror::Error)]
#[error("providers.{provider}: {message}")]
pub struct BuildError {
    /// Provider name.
    pub provider: String,
    /// What went wrong.
    pub message: String,
}

/// A configured upstream.
#[derive(Debug, Clone)]
pub enum Provider {
    /// OpenAI-compatible.
    OpenAi(openai::OpenAiProvider),
    /// Anthropic Messages.
    Anthropic(anthropic::AnthropicProvider),
    /// Built-in simulator.
    Simulated(simulated::SimulatedProvider),
}

impl Provider {
    /// Builds a provider; `api_key` is the already-resolved secret, if any.
    pub fn build(cfg: &ProviderConfig, api_key: Option<String>) -> Result<Provider, BuildError> {
        Ok(match &cfg.kind {
            ProviderKind::OpenAi(o) => {
                Provider::OpenAi(openai::OpenAiProvider::new(cfg, o, api_key)?)
            }
            ProviderKind::Anthropic(a) => {
                Provider::Anthropic(anthropic::AnthropicProvider::new(cfg, a, api_key)?)
            }
            ProviderKind::Simulated(s) => {
                Provider::Simulated(simulated::SimulatedProvider::new(&cfg.name, s.clone()))
            }
        })
    }

    /// The provider's configured name.
    pub fn name(&self) -> &str {
        match self {
            Provider::OpenAi(p) => p.name(),
            Provider::Anthropic(p) => p.name(),
            Provider::Simulated(p) => p.name(),
        }
    }

    /// The provider kind (`openai`, `anthropic`, `simulated`).
    pub fn kind(&self) -> &'static str {
        match self {
            Provider::OpenAi(_) => "openai",
            Provider::Anthropic(_) => "anthropic",
            Provider::Simulated(_) => "simulated",
        }
    }

    /// A non-streamed completion.
    pub async fn complete(&self, req: &ChatRequest) -> Result<Completion, ProviderError> {
        match self {
            Provider::OpenAi(p) => p.complete(req).await,
            Provider::Anthropic(p) => p.complete(req).await,
            Provider::Simulated(p) => p.complete(req).await,
        }
    }

    /// A non-streamed completion as the request path takes it: an OpenAI
    /// answer of the usual shape is kept as its bytes (see [`Reply`]).
    pub async fn reply(&self, req: &ChatRequest) -> Result<Reply, ProviderError> {
        match self {
            Provider::OpenAi(p) => p.reply(req).await,
            Provider::Anthropic(p) => p.complete(req).await.map(Reply::Complete),
            Provider::Simulated(p) => p.complete(req).await.map(Reply::Complete),
        }
    }

    /// A streamed completion. The returned stream already passed the
    /// upstream's status check; errors after that arrive as stream items.
    pub async fn stream(&self, req: &ChatRequest) -> Result<ChunkStream, ProviderError> {
        match self {
            Provider::OpenAi(p) => p.stream(req).await,
            Provider::Anthropic(p) => p.stream(req).await,
            Provider::Simulated(p) => p.stream(req).await,
        }
    }
}

/// A config with an OpenAI-compatible provider `o` and an Anthropic one `a`,
/// both pointing at a closed loopback port, for unit tests.
#[cfg(test)]
pub(crate) fn test_config() -> sluice_core::Config {
    sluice_core::Config::parse(
        r#"
allow_anonymous = true
[providers.o]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "K"
[providers.a]
kind = "anthropic"
base_url = "http://127.0.0.1:9"
api_key_env = "K"
[deployments.d]
stable = "v1"
variants.v1 = { provider = "o", model = "m" }
"#,
    )
    .expect("config")
}

#[cfg(test)]
mod tests {
    use super::Provider;
    use proptest::prelude::*;
    use std::time::Duration;

    proptest! {
        /// Gathered pieces are the pieces joined, as long as they fit the
        /// limit; the first piece that does not is refused and the body
        /// stays what it was.
        #[test]
        fn gathered_pieces_join_up_to_the_limit(
            pieces in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 0..8),
            limit in 0usize..200,
        ) {
            let mut g = super::Gathered::default();
            let mut joined = Vec::new();
            for p in pieces {
                let fits = joined.len() + p.len() <= limit;
                prop_assert_eq!(g.push(bytes::Bytes::from(p.clone()), limit), fits);
                if !fits {
                    break;
                }
                joined.extend_from_slice(&p);
            }
            prop_assert_eq!(&g.into_bytes()[..], &joined[..]);
        }
    }

    /// A future that is already done finishes without waiting, even with
    /// no time at all; one that waits is cut at the limit, counted from the
    /// first poll; one that finishes in time gives its output.
    #[tokio::test]
    async fn within_limits_only_what_waits() {
        assert_eq!(
            super::within(Duration::ZERO, async { 7 }).await.ok(),
            Some(7)
        );
        let started = std::time::Instant::now();
        let cut = super::within(Duration::from_millis(50), std::future::pending::<()>()).await;
        assert!(cut.is_err());
        assert!(started.elapsed() >= Duration::from_millis(50));
        let late = super::within(Duration::from_secs(5), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            "done"
        })
        .await;
        assert_eq!(late.ok(), Some("done"));
    }

    /// A provider's key never shows in its debug output (which is what ends
    /// up in logs and panics).
    #[test]
    fn provider_keys_are_not_printed() {
        let c = super::test_config();
        for name in ["o", "a"] {
            let p = Provider::build(&c.providers[name], Some("sk-very-secret-123".into()))
                .expect("builds");
            let shown = format!("{p:?}");
            assert!(!shown.contains("sk-very-secret-123"), "{shown}");
        }
    }
}
