//! HTTP plumbing shared by the real-protocol providers: client construction,
//! timeouts, upstream error extraction and SSE decoding of response bodies.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use sluice_core::config::ProviderConfig;
use sluice_core::sse::{SseDecoder, SseEvent};

use crate::{BuildError, ProviderError};

/// Largest error body read from an upstream.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Largest non-streamed response accepted from an upstream.
const MAX_RESPONSE_BODY: usize = 64 * 1024 * 1024;

/// A client for one provider; `headers` (auth, content type, extras) are
/// sent with every request without being copied per request.
pub(crate) fn build_client(
    cfg: &ProviderConfig,
    headers: reqwest::header::HeaderMap,
) -> Result<reqwest::Client, BuildError> {
    reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(cfg.connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .user_agent(concat!("sluice/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| BuildError {
            provider: cfg.name.clone(),
            message: format!("cannot build HTTP client: {e}"),
        })
}

pub(crate) fn bad_url(provider: &str, e: impl std::fmt::Display) -> BuildError {
    BuildError {
        provider: provider.to_string(),
        message: format!("base_url does not make a valid URL: {e}"),
    }
}

pub(crate) fn map_send_error(provider: &str, e: &reqwest::Error, after: Duration) -> ProviderError {
    if e.is_timeout() {
        ProviderError::Timeout {
            provider: provider.to_string(),
            after,
            phase: "response",
        }
    } else {
        // Connect failures and connections dropped before a response.
        ProviderError::Unreachable {
            provider: provider.to_string(),
            message: error_chain(e),
            connect: e.is_connect(),
        }
    }
}

/// The error and its causes, joined (reqwest's top-level message alone is
/// rarely actionable).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// Sends a request, allowing `timeout` until the response headers arrive.
pub(crate) async fn send(
    provider: &str,
    req: reqwest::RequestBuilder,
    timeout: Duration,
    phase: &'static str,
) -> Result<reqwest::Response, ProviderError> {
    match tokio::time::timeout(timeout, req.send()).await {
        Err(_) => Err(ProviderError::Timeout {
            provider: provider.to_string(),
            after: timeout,
            phase,
        }),
        Ok(Err(e)) => Err(map_send_error(provider, &e, timeout)),
        Ok(Ok(r)) => Ok(r),
    }
}

/// Reads a body up to `limit` bytes before `deadline`.
pub(crate) async fn read_body(
    provider: &str,
    resp: reqwest::Response,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ProviderError> {
    let read = async {
        let mut out = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|e| ProviderError::Stream {
                provider: provider.to_string(),
                message: format!("response body broke off: {}", error_chain(&e)),
            })?;
            if out.len() + piece.len() > limit {
                return Err(ProviderError::InvalidResponse {
                    provider: provider.to_string(),
                    message: format!("response body larger than {limit} bytes"),
                });
            }
            out.extend_from_slice(&piece);
        }
        Ok(Bytes::from(out))
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(ProviderError::Timeout {
            provider: provider.to_string(),
            after: timeout,
            phase: "response body",
        }),
        Ok(r) => r,
    }
}

/// Reads a successful JSON response.
pub(crate) async fn read_json(
    provider: &str,
    resp: reqwest::Response,
    timeout: Duration,
) -> Result<(Value, Bytes), ProviderError> {
    let body = read_body(provider, resp, MAX_RESPONSE_BODY, timeout).await?;
    let v: Value = serde_json::from_slice(&body).map_err(|e| ProviderError::InvalidResponse {
        provider: provider.to_string(),
        message: format!("body is not valid JSON ({e}): {}", snippet(&body)),
    })?;
    Ok((v, body))
}

/// The first 200 characters of a body, for error messages.
pub(crate) fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    if s.chars().count() > 200 {
        format!("{}…", s.chars().take(200).collect::<String>())
    } else if s.is_empty() {
        "(empty body)".to_string()
    } else {
        s.to_string()
    }
}

/// Turns a non-2xx response into a [`ProviderError::Status`], extracting the
/// upstream's own message from OpenAI- or Anthropic-shaped error bodies.
pub(crate) async fn status_error(provider: &str, resp: reqwest::Response) -> ProviderError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let body = read_body(provider, resp, MAX_ERROR_BODY, Duration::from_secs(5))
        .await
        .unwrap_or_default();
    let message = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("error")
                .and_then(|e| e.get("message").or(Some(e)))
                .and_then(|m| m.as_str().map(str::to_string))
        })
        .unwrap_or_else(|| snippet(&body));
    ProviderError::Status {
        provider: provider.to_string(),
        status,
        message,
        retry_after,
    }
}

struct SseState<S> {
    body: S,
    decoder: SseDecoder,
    ready: VecDeque<SseEvent>,
    done: bool,
    provider: String,
    timeouts: StreamTimeouts,
    /// When the first piece of body must have arrived.
    first_by: Option<tokio::time::Instant>,
    /// When the whole stream must be over.
    end_by: tokio::time::Instant,
}

/// The waits a streamed response is allowed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamTimeouts {
    /// From the request being sent to the first piece of body.
    pub first_byte: Duration,
    /// Between two pieces of body.
    pub idle: Duration,
    /// The whole stream.
    pub total: Duration,
}

/// Decodes a streaming response body into SSE events. The first piece of
/// body must arrive within `first_byte` of `sent`, each later one within
/// `idle` of the previous, and the whole body within `total`; a body that
/// breaks off is an error item; a clean end of body ends the stream.
pub(crate) fn sse_events(
    provider: &str,
    resp: reqwest::Response,
    timeouts: StreamTimeouts,
    sent: std::time::Instant,
) -> impl Stream<Item = Result<SseEvent, ProviderError>> + Send + 'static {
    let sent = tokio::time::Instant::from_std(sent);
    let state = SseState {
        body: resp.bytes_stream().boxed(),
        decoder: SseDecoder::default(),
        ready: VecDeque::new(),
        done: false,
        provider: provider.to_string(),
        timeouts,
        first_by: Some(sent + timeouts.first_byte),
        end_by: sent + timeouts.total,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.ready.pop_front() {
                return Some((Ok(ev), st));
            }
            if st.done {
                return None;
            }
            let (wait_until, after, phase) = match st.first_by {
                Some(t) => (t, st.timeouts.first_byte, "first byte"),
                None => (
                    tokio::time::Instant::now() + st.timeouts.idle,
                    st.timeouts.idle,
                    "between chunks",
                ),
            };
            let (wait_until, after, phase) = if st.end_by < wait_until {
                (st.end_by, st.timeouts.total, "whole stream")
            } else {
                (wait_until, after, phase)
            };
            let next = tokio::time::timeout_at(wait_until, st.body.next()).await;
            st.first_by = None;
            match next {
                Err(_) => {
                    st.done = true;
                    let e = ProviderError::Timeout {
                        provider: st.provider.clone(),
                        after,
                        phase,
                    };
                    return Some((Err(e), st));
                }
                Ok(None) => {
                    st.done = true;
                    match st.decoder.finish() {
                        Ok(Some(ev)) => st.ready.push_back(ev),
                        Ok(None) => {}
                        Err(e) => {
                            let e = ProviderError::Stream {
                                provider: st.provider.clone(),
                                message: e.to_string(),
                            };
                            return Some((Err(e), st));
                        }
                    }
                }
                Ok(Some(Err(e))) => {
                    st.done = true;
                    let e = ProviderError::Stream {
                        provider: st.provider.clone(),
                        message: format!("connection broke off mid-stream: {}", error_chain(&e)),
                    };
                    return Some((Err(e), st));
                }
                Ok(Some(Ok(bytes))) => match st.decoder.feed(&bytes) {
                    Ok(evs) => st.ready.extend(evs),
                    Err(e) => {
                        st.done = true;
                        let e = ProviderError::Stream {
                            provider: st.provider.clone(),
                            message: e.to_string(),
                        };
                        return Some((Err(e), st));
                    }
                },
            }
        }
    })
}
