//! The `/metrics` endpoint: a minimal HTTP/1.1 server on its own listener
//! (`--metrics-listen`), apart from the gRPC port so a scraper needs no
//! client certificate. It answers `GET /metrics` (Prometheus text) and 404
//! otherwise, one request per connection, with a read deadline and a header
//! size cap so a stuck or hostile client costs one small task at most.

use std::time::Duration;

use crate::metrics::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// Largest request head read; a scraper's is a few hundred bytes.
const MAX_HEAD: usize = 8 * 1024;
/// A client must send its request head within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves when the server should stop.
pub type Shutdown = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Binds `addr` and serves the process's registry there for as long as the
/// process runs; returns the bound address (port 0 picks one).
pub async fn start(addr: std::net::SocketAddr) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, crate::metrics(), Box::pin(std::future::pending())));
    tracing::info!(addr = %bound, "serving Prometheus metrics at /metrics");
    Ok(bound)
}

/// Serves `registry` on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, registry: &'static Registry, shutdown: Shutdown) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, registry));
                }
                Err(err) => {
                    // Out of descriptors, usually: pause rather than spin.
                    tracing::warn!(error = %err, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn answer(mut stream: TcpStream, registry: &'static Registry) {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Some(head)) => head,
        _ => return,
    };
    let response = respond(&head, registry);
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// The whole HTTP response to a request head.
fn respond(head: &str, registry: &Registry) -> String {
    let mut words = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", registry.render()),
        ("GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "only /metrics is served here\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain; charset=utf-8", "GET only\n".to_string()),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Def, Kind};

    static UP: Def = Def { name: "t_up", help: "Up.", kind: Kind::Gauge, labels: &[] };

    #[test]
    fn answers_metrics_and_refuses_the_rest() {
        let r = Registry::default();
        r.set(&UP, &[], 1.0);
        let ok = respond("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &r);
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.ends_with("t_up 1\n"), "{ok}");
        assert!(respond("GET / HTTP/1.1\r\n\r\n", &r).starts_with("HTTP/1.1 404"));
        assert!(respond("POST /metrics HTTP/1.1\r\n\r\n", &r).starts_with("HTTP/1.1 405"));
        assert!(respond("", &r).starts_with("HTTP/1.1 405"));
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        static R: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
        let registry = R.get_or_init(Registry::default);
        registry.set(&UP, &[], 1.0);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            registry,
            Box::pin(async move {
                let _ = rx.await;
            }),
        ));
        let mut client = TcpStream::connect(addr).await.expect("connect");
        client.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n").await.expect("write");
        let mut text = String::new();
        client.read_to_string(&mut text).await.expect("read");
        assert!(text.contains("t_up 1\n"), "{text}");
        let _ = tx.send(());
        server.await.expect("server task");
    }
}
