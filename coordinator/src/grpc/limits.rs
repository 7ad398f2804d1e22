//! Connection and time limits of the coordinator's gRPC server, applied in
//! one place ([`apply`]) so the server assembly stays a straight line:
//!
//! - **Request timeout** (`--request-timeout`, tonic's `Server::timeout`, so
//!   a slow handler answers `DEADLINE_EXCEEDED` rather than an h2 error): a
//!   request whose body is dripped, or a handler stuck on the store, ends.
//!   Streams (watch, patch download) are bounded only until their first answer.
//! - **Operator load shedding** (`--operator-concurrency`, [`Shed`]): at most
//!   that many operator requests in flight across all connections; more are
//!   refused at once with `RESOURCE_EXHAUSTED` instead of queueing. Agents'
//!   heartbeats are not counted, so an operator flood never makes the fleet
//!   look lost.
//! - **Registration admission** (`--registrations-in-flight`,
//!   [`crate::admission`]): at most that many registrations served at once;
//!   more are told when to come back (`RESOURCE_EXHAUSTED` with a pushback).
//! - **HTTP/2**: keepalive pings (`--keepalive-interval`/`--keepalive-timeout`)
//!   close connections whose peer stopped answering; at most
//!   [`MAX_STREAMS_PER_CONNECTION`] concurrent streams per connection.
//! - **Accept side** (`--max-connections`, `--handshake-timeout`): see
//!   [`hotfleet_proto::listener`]; the open-files limit is raised to its hard
//!   limit first.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use hotfleet_proto::listener::{self, ConnLimits, Incoming};
use tokio::{net::TcpListener, sync::Semaphore};
use tonic::{
    body::Body,
    codegen::{http, Service},
    server::NamedService,
    transport::Server,
    Status,
};

/// Concurrent streams one HTTP/2 connection may open.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Descriptors kept free of connections (the store, etcd, agent calls, logs).
const RESERVED_FDS: u64 = 256;

/// The limits, as configured (see the module docs for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    pub request_timeout: Duration,
    pub operator_concurrency: usize,
    pub registrations_in_flight: usize,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(60),
            operator_concurrency: 64,
            registrations_in_flight: 256,
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Applies every limit: the builder's request timeout and HTTP/2 settings,
/// and the accepted connections of `listener` under the connection limits.
pub fn apply(builder: Server, listener: TcpListener, limits: &ServeLimits) -> (Server, Incoming) {
    let builder = builder
        .timeout(limits.request_timeout)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let max_connections = listener::fit_max_connections(limits.max_connections, RESERVED_FDS);
    let incoming = Incoming::new(listener, ConnLimits { max_connections, handshake_timeout: limits.handshake_timeout });
    (builder, incoming)
}

/// Load shedding for one service: at most `limit` requests in flight across
/// every connection; the next is answered `RESOURCE_EXHAUSTED` at once.
#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    limit: usize,
}

impl<S> Shed<S> {
    pub fn new(inner: S, limit: usize) -> Self {
        Self { inner, permits: Arc::new(Semaphore::new(limit.max(1))), limit: limit.max(1) }
    }
}

impl<S: NamedService> NamedService for Shed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Shed<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            let status = Status::resource_exhausted(format!(
                "the coordinator is busy: {} operator requests are in flight (--operator-concurrency); retry shortly",
                self.limit
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let answer = self.inner.call(request);
        Box::pin(async move {
            // Held until the answer (a stream's first message) is ready.
            let answer = answer.await;
            drop(permit);
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service that answers once a permit of its gate is released.
    #[derive(Clone)]
    struct Slow(Arc<Semaphore>);

    impl Service<http::Request<Body>> for Slow {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            let gate = self.0.clone();
            Box::pin(async move {
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
                Ok(http::Response::new(Body::empty()))
            })
        }
    }

    fn grpc_status(response: &http::Response<Body>) -> Option<&str> {
        response.headers().get("grpc-status").and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn requests_beyond_the_limit_are_shed_and_capacity_returns() {
        let gate = Arc::new(Semaphore::new(0));
        let mut shed = Shed::new(Slow(gate.clone()), 2);
        let first = shed.call(http::Request::new(Body::empty()));
        let second = shed.call(http::Request::new(Body::empty()));
        let refused = shed.call(http::Request::new(Body::empty())).await.expect("infallible");
        assert_eq!(grpc_status(&refused), Some("8"), "RESOURCE_EXHAUSTED");
        let message = refused.headers().get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or_default();
        assert!(message.contains("operator-concurrency"), "{message}");
        gate.add_permits(3);
        for answer in [first.await, second.await] {
            assert!(grpc_status(&answer.expect("infallible")).is_none(), "admitted requests are answered");
        }
        let again = shed.call(http::Request::new(Body::empty())).await.expect("infallible");
        assert!(grpc_status(&again).is_none(), "finished requests give their place back");
    }
}
