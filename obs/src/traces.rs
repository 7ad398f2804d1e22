//! Traces: a rollout is one trace (rollout → step → per-node RPC → the
//! agent's command → each runtime's prepare/commit), exported over OTLP/gRPC
//! when `--otlp-endpoint` (or the standard `OTEL_EXPORTER_OTLP_*ENDPOINT`)
//! is set. Off by default: then no exporter, no OpenTelemetry layer, no
//! header written or read, so spans cost what plain `tracing` spans cost.
//!
//! A rollout's trace id is derived from its id ([`rollout_trace_id`]), so
//! the coordinator's and the agents' log lines name the same trace id even
//! with export off, and a rollout resumed by another leader (or after a
//! restart) continues the same trace. The W3C `traceparent` header carries
//! the span context across gRPC calls (see `grpc`).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, SystemTime},
};

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{
        Span as _, SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
        TracerProvider as _,
    },
    Context, KeyValue,
};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    runtime,
    trace::{span_processor_with_async_runtime::BatchSpanProcessor, SdkTracer, SdkTracerProvider},
    Resource,
};
use sha2::{Digest, Sha256};
use tonic::codegen::http;
use tracing_opentelemetry::OpenTelemetrySpanExt;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (headers are only written and read then).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Why export could not start.
#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter: {0}")]
pub struct TraceError(String);

/// The endpoint to export to: the flag, else the standard environment
/// (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`);
/// none when `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`.
pub fn endpoint(flag: Option<&str>) -> Option<String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return None;
    }
    flag.map(str::to_string)
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// The exporting tracer provider; flush it with [`Exporting::shutdown`].
pub struct Exporting {
    provider: SdkTracerProvider,
}

impl Exporting {
    /// Exports to `endpoint` in batches on the current tokio runtime, as
    /// `service` (unless `OTEL_SERVICE_NAME` names it).
    pub fn start(endpoint: &str, service: &'static str) -> Result<Self, TraceError> {
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| TraceError(e.to_string()))?;
        let mut resource = Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service);
        }
        Ok(Self::with_processor(BatchSpanProcessor::builder(exporter, runtime::Tokio).build(), resource.build()))
    }

    /// A provider around any processor (tests pass an in-memory exporter's).
    pub fn with_processor(
        processor: impl opentelemetry_sdk::trace::SpanProcessor + 'static,
        resource: Resource,
    ) -> Self {
        let provider = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
        opentelemetry::global::set_tracer_provider(provider.clone());
        ENABLED.store(true, Ordering::Relaxed);
        Exporting { provider }
    }

    pub fn tracer(&self) -> SdkTracer {
        self.provider.tracer("hotfleet")
    }

    /// Exports what is still buffered (at exit).
    pub fn shutdown(&self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }
}

/// The trace id of a rollout: the first 16 bytes of SHA-256 of its id.
pub fn rollout_trace_id(rollout_id: &str) -> TraceId {
    let digest = Sha256::digest(format!("hotfleet-rollout:{rollout_id}").as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    TraceId::from_bytes(id)
}

/// Makes `span` (a rollout's) part of the rollout's trace: its parent is a
/// virtual span whose ids derive from the rollout id, the same for every
/// leader that drives it.
pub fn join_rollout_trace(span: &tracing::Span, rollout_id: &str) {
    if !enabled() {
        return;
    }
    let digest = Sha256::digest(format!("hotfleet-rollout-root:{rollout_id}").as_bytes());
    let mut root = [0u8; 8];
    root.copy_from_slice(&digest[..8]);
    let parent = SpanContext::new(
        rollout_trace_id(rollout_id),
        SpanId::from_bytes(root),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(Context::new().with_remote_span_context(parent));
}

/// Writes the current span's context as `traceparent` into outgoing headers.
pub fn inject(headers: &mut http::HeaderMap) {
    if !enabled() {
        return;
    }
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut Headers(headers));
}

/// Makes `span` a child of the `traceparent` of incoming headers, if any.
pub fn adopt(span: &tracing::Span, headers: &http::HeaderMap) {
    if !enabled() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeadersRef(headers));
    let _ = span.set_parent(cx);
}

/// The `traceparent` of the current span, for a peer that is not gRPC (the
/// local runtime protocol); empty when export is off.
pub fn current_traceparent() -> String {
    let mut headers = http::HeaderMap::new();
    inject(&mut headers);
    headers.get("traceparent").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

/// Emits a finished span, child of the current one, that ended now and took
/// `took`: timings another party measured (a runtime's prepare, its commit
/// pause) joined to the trace.
pub fn emit_measured(name: &'static str, took: Duration, attributes: Vec<KeyValue>) {
    if !enabled() {
        return;
    }
    let parent = tracing::Span::current().context();
    let tracer = opentelemetry::global::tracer("hotfleet");
    let end = SystemTime::now();
    let start = end.checked_sub(took).unwrap_or(end);
    let mut span = tracer
        .span_builder(name)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    span.end_with_timestamp(end);
}

struct Headers<'a>(&'a mut http::HeaderMap);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) =
            (http::header::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

struct HeadersRef<'a>(&'a http::HeaderMap);

impl Extractor for HeadersRef<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::header::HeaderName::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollout_always_has_the_same_trace_id() {
        assert_eq!(rollout_trace_id("ro-1"), rollout_trace_id("ro-1"));
        assert_ne!(rollout_trace_id("ro-1"), rollout_trace_id("ro-2"));
        assert_eq!(rollout_trace_id("ro-1").to_string().len(), 32);
    }

    #[test]
    fn the_environment_names_the_endpoint_unless_export_is_disabled() {
        // One test owns these variables (tests run in parallel threads).
        std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317");
        assert_eq!(endpoint(None).as_deref(), Some("http://collector:4317"));
        assert_eq!(endpoint(Some("http://flag:4317")).as_deref(), Some("http://flag:4317"));
        std::env::set_var("OTEL_SDK_DISABLED", "true");
        assert_eq!(endpoint(Some("http://flag:4317")), None);
        std::env::remove_var("OTEL_SDK_DISABLED");
        std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT");
        assert_eq!(endpoint(None), None);
    }
}
