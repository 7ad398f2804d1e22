//! The one tower layer that counts, times and traces every gRPC call, on
//! servers (`Server::builder().layer(GrpcLayer::server())`) and on clients
//! (around a `Channel`), so no handler or call site records anything itself.
//!
//! Traces (only while exporting, see `traces`): a client writes the current
//! span's W3C `traceparent` into the request's metadata; a server answers
//! inside a `grpc` span whose parent is the `traceparent` it received, so the
//! handler's spans join the caller's trace.
//!
//! The code is the `grpc-status` a response carries in its headers (every
//! error a handler returns, and every refusal of a gate or limit, is a
//! trailers-only answer), else `OK`; a call that failed below gRPC (no
//! connection) is `transport_error`. A stream is timed to its first headers.
//! Paths a server does not serve (`UNIMPLEMENTED`) are counted under
//! `method="unknown"`, so a caller cannot grow the series without bound.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Instant,
};

use tonic::codegen::{http, Service};

use tracing::Instrument;

use crate::{
    metrics::{metrics, Def, Kind, LATENCY},
    traces,
};

pub static SERVER_REQUESTS: Def = Def {
    name: "hotfleet_grpc_server_requests_total",
    help: "gRPC requests served, by method and status code.",
    kind: Kind::Counter,
    labels: &["method", "code"],
};
pub static SERVER_LATENCY: Def = Def {
    name: "hotfleet_grpc_server_request_duration_seconds",
    help: "Time to answer a gRPC request (a stream: to its first headers), by method.",
    kind: Kind::Histogram(LATENCY),
    labels: &["method"],
};
pub static CLIENT_REQUESTS: Def = Def {
    name: "hotfleet_grpc_client_requests_total",
    help: "gRPC calls made, by method and status code.",
    kind: Kind::Counter,
    labels: &["method", "code"],
};
pub static CLIENT_LATENCY: Def = Def {
    name: "hotfleet_grpc_client_request_duration_seconds",
    help: "Time until a gRPC call's answer (a stream: its first headers), by method.",
    kind: Kind::Histogram(LATENCY),
    labels: &["method"],
};

/// Which side of a call a layer measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Server,
    Client,
}

/// Counts and times every call through it.
#[derive(Debug, Clone, Copy)]
pub struct GrpcLayer(Side);

impl GrpcLayer {
    pub fn server() -> Self {
        GrpcLayer(Side::Server)
    }

    pub fn client() -> Self {
        GrpcLayer(Side::Client)
    }
}

impl<S> tower::Layer<S> for GrpcLayer {
    type Service = Grpc<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Grpc { inner, side: self.0 }
    }
}

/// A service behind [`GrpcLayer`].
#[derive(Debug, Clone)]
pub struct Grpc<S> {
    inner: S,
    side: Side,
}

type Answer<R, E> = Pin<Box<dyn Future<Output = Result<R, E>> + Send>>;

impl<S, B, RB> Service<http::Request<B>> for Grpc<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = Answer<http::Response<RB>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_string();
        let side = self.side;
        let started = Instant::now();
        let span = match side {
            Side::Client => {
                traces::inject(request.headers_mut());
                None
            }
            Side::Server if traces::enabled() => {
                let span = tracing::info_span!("grpc", method = %method, otel.kind = "server");
                traces::adopt(&span, request.headers());
                Some(span)
            }
            Side::Server => None,
        };
        let answer = self.inner.call(request);
        let answer = async move {
            let result = answer.await;
            let code = match &result {
                Ok(response) => code_name(response.headers()),
                Err(_) => "transport_error",
            };
            record(side, &method, code, started);
            result
        };
        match span {
            Some(span) => Box::pin(answer.instrument(span)),
            None => Box::pin(answer),
        }
    }
}

fn record(side: Side, method: &str, code: &str, started: Instant) {
    let method = if code == "Unimplemented" { "unknown" } else { method };
    let (requests, latency) = match side {
        Side::Server => (&SERVER_REQUESTS, &SERVER_LATENCY),
        Side::Client => (&CLIENT_REQUESTS, &CLIENT_LATENCY),
    };
    let registry = metrics();
    registry.inc(requests, &[method, code]);
    registry.observe_duration(latency, &[method], started.elapsed());
}

/// Counts and times one call that passed through no [`GrpcLayer`]: a unary
/// call carried down an attached stream (`AgentGateway.Attach`), counted
/// under the method it stands for, so dashboards see one kind of call.
pub fn record_call(side: Side, method: &str, code: tonic::Code, started: Instant) {
    record(side, method, code_str(code), started);
}

/// The span a server answers such a call in: as the layer's, a child of the
/// caller's `traceparent` (if any). Disabled while traces are not exported.
pub fn server_span(method: &str, traceparent: &str) -> tracing::Span {
    if !traces::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("grpc", method = %method, otel.kind = "server");
    if let Ok(value) = http::HeaderValue::from_str(traceparent) {
        let mut headers = http::HeaderMap::new();
        headers.insert("traceparent", value);
        traces::adopt(&span, &headers);
    }
    span
}

/// The status code's name (`OK`, `Unavailable`, ...) from response headers.
fn code_name(headers: &http::HeaderMap) -> &'static str {
    let Some(value) = headers.get("grpc-status") else { return "OK" };
    let number = value.to_str().ok().and_then(|s| s.parse::<i32>().ok()).unwrap_or(2);
    code_str(tonic::Code::from_i32(number))
}

/// A status code's name as the metrics label it.
pub fn code_str(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "Cancelled",
        tonic::Code::Unknown => "Unknown",
        tonic::Code::InvalidArgument => "InvalidArgument",
        tonic::Code::DeadlineExceeded => "DeadlineExceeded",
        tonic::Code::NotFound => "NotFound",
        tonic::Code::AlreadyExists => "AlreadyExists",
        tonic::Code::PermissionDenied => "PermissionDenied",
        tonic::Code::ResourceExhausted => "ResourceExhausted",
        tonic::Code::FailedPrecondition => "FailedPrecondition",
        tonic::Code::Aborted => "Aborted",
        tonic::Code::OutOfRange => "OutOfRange",
        tonic::Code::Unimplemented => "Unimplemented",
        tonic::Code::Internal => "Internal",
        tonic::Code::Unavailable => "Unavailable",
        tonic::Code::DataLoss => "DataLoss",
        tonic::Code::Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{Layer, ServiceExt};

    fn answer(status: Option<&'static str>) -> http::Response<()> {
        let mut response = http::Response::new(());
        if let Some(s) = status {
            response.headers_mut().insert("grpc-status", http::HeaderValue::from_static(s));
        }
        response
    }

    #[tokio::test]
    async fn counts_each_call_by_method_and_code() {
        let before = metrics().value(&SERVER_REQUESTS, &["/t.S/Ok", "OK"]).unwrap_or(0.0);
        let ok = GrpcLayer::server()
            .layer(tower::service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>(answer(None)) }));
        let request = || http::Request::builder().uri("/t.S/Ok").body(()).expect("request");
        ok.clone().oneshot(request()).await.expect("answer");
        ok.oneshot(request()).await.expect("answer");
        assert_eq!(metrics().value(&SERVER_REQUESTS, &["/t.S/Ok", "OK"]), Some(before + 2.0));

        let denied = GrpcLayer::client()
            .layer(tower::service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>(answer(Some("7"))) }));
        denied.oneshot(http::Request::builder().uri("/t.S/No").body(()).expect("request")).await.expect("answer");
        assert!(metrics().value(&CLIENT_REQUESTS, &["/t.S/No", "PermissionDenied"]).is_some());
        assert!(metrics().value(&CLIENT_LATENCY, &["/t.S/No"]).is_some());
    }

    #[tokio::test]
    async fn a_call_carries_the_callers_span_into_the_servers() {
        use opentelemetry_sdk::trace::{InMemorySpanExporter, SimpleSpanProcessor};
        use tracing_subscriber::layer::SubscriberExt;

        let exporter = InMemorySpanExporter::default();
        let exporting = crate::traces::Exporting::with_processor(
            SimpleSpanProcessor::new(exporter.clone()),
            opentelemetry_sdk::Resource::builder().build(),
        );
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(exporting.tracer()));
        let _guard = tracing::subscriber::set_default(subscriber);
        let server = GrpcLayer::server().layer(tower::service_fn(|_: http::Request<()>| async {
            let _handler = tracing::info_span!("handler").entered();
            Ok::<_, Infallible>(answer(None))
        }));
        // The "network": the request, headers included, reaches the server.
        let client = GrpcLayer::client().layer(tower::service_fn(move |request: http::Request<()>| {
            let server = server.clone();
            async move { server.oneshot(request).await }
        }));
        let caller = tracing::info_span!("caller");
        let request = http::Request::builder().uri("/t.S/Traced").body(()).expect("request");
        client.oneshot(request).instrument(caller.clone()).await.expect("answer");
        drop(caller);

        let spans = exporter.get_finished_spans().expect("spans");
        let find = |name: &str| spans.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no {name} span"));
        let (caller, grpc, handler) = (find("caller"), find("grpc"), find("handler"));
        assert_eq!(grpc.parent_span_id, caller.span_context.span_id(), "the server joined the caller's span");
        assert_eq!(handler.parent_span_id, grpc.span_context.span_id(), "the handler runs inside it");
        assert_eq!(grpc.span_context.trace_id(), caller.span_context.trace_id());
    }

    #[tokio::test]
    async fn unserved_paths_share_one_series() {
        let unknown = GrpcLayer::server()
            .layer(tower::service_fn(|_: http::Request<()>| async { Ok::<_, Infallible>(answer(Some("12"))) }));
        unknown.oneshot(http::Request::builder().uri("/random/xyz").body(()).expect("request")).await.expect("answer");
        assert!(metrics().value(&SERVER_REQUESTS, &["unknown", "Unimplemented"]).is_some());
        assert!(metrics().value(&SERVER_REQUESTS, &["/random/xyz", "Unimplemented"]).is_none());
    }
}
