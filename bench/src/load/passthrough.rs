//! A bare reverse proxy on sluice's own stack (tokio's work-stealing
//! runtime, hyper's HTTP/1.1 server and client), doing nothing but
//! forwarding: the `hyper-proxy` scenario.
//!
//! It measures what the stack costs before any of sluice's work (reading
//! and checking the request, the policies, the record and its insert), so
//! the harness can split sluice's added latency and CPU into the stack's
//! share and sluice's own. It is as cheap as a hyper proxy can be: each
//! client connection gets one upstream connection of its own, driven in
//! the same task (no pool, no hand-off between tasks), and bodies stream
//! through untouched.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

fn lock(s: &Mutex<SendRequest<Incoming>>) -> MutexGuard<'_, SendRequest<Incoming>> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// Forwards one request on the connection's own upstream connection.
async fn forward(
    sender: Arc<Mutex<SendRequest<Incoming>>>,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, hyper::Error> {
    // HTTP/1.1 without pipelining: the upstream connection is free once the
    // previous answer has been read to its end.
    futures_util::future::poll_fn(|cx| lock(&sender).poll_ready(cx)).await?;
    let sent = lock(&sender).send_request(req);
    sent.await
}

/// Serves one client connection against its own connection to `upstream`.
async fn connection(client: TcpStream, upstream: SocketAddr) {
    let Ok(up) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = up.set_nodelay(true);
    let Ok((sender, upstream_conn)) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await
    else {
        return;
    };
    let sender = Arc::new(Mutex::new(sender));
    let svc = hyper::service::service_fn(move |req| forward(sender.clone(), req));
    let server = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(client), svc);
    // Both halves in one task: a request handed to the upstream connection
    // wakes this task, not another.
    tokio::select! {
        _ = server => {}
        _ = upstream_conn => {}
    }
}

/// Serves the proxy on `listener`, forwarding to `upstream`, until the
/// process ends.
pub async fn serve(listener: TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, upstream));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::mock::{self, Latency, MockConfig};
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};

    /// Sends `count` requests on one kept-alive connection; each answer's
    /// status and body.
    async fn exchange(addr: SocketAddr, count: usize) -> Vec<(u16, String)> {
        let io = TokioIo::new(TcpStream::connect(addr).await.expect("connect"));
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(io)
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let body = r#"{"model":"support","messages":[{"role":"user","content":"hi"}]}"#;
        let mut out = Vec::new();
        for _ in 0..count {
            sender.ready().await.expect("connection kept alive");
            let req = Request::post("/v1/chat/completions")
                .header("host", "x")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(body.as_bytes())))
                .expect("request");
            let resp = sender.send_request(req).await.expect("answer");
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await.expect("body").to_bytes();
            out.push((status, String::from_utf8_lossy(&bytes).into_owned()));
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forwards_the_mocks_answers_on_a_kept_alive_connection() {
        let cfg = MockConfig {
            latency: Latency::Fixed(std::time::Duration::ZERO),
            chunks: 2,
            interval: std::time::Duration::from_millis(1),
        };
        let upstream = mock::spawn("127.0.0.1:0".parse().expect("addr"), cfg)
            .await
            .expect("mock");
        let l = mock::listen("127.0.0.1:0".parse().expect("addr")).expect("listen");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(serve(l, upstream));
        let answers = tokio::time::timeout(std::time::Duration::from_secs(10), exchange(addr, 3))
            .await
            .expect("the proxy answered within 10 s");
        assert_eq!(answers.len(), 3);
        for (status, body) in answers {
            assert_eq!(status, 200, "{body}");
            assert!(body.contains("\"chat.completion\""), "{body}");
        }
    }
}
