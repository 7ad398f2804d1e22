//! hotfleet's observability, shared by the coordinator and the agent: how
//! logs are written (`logs`), the Prometheus metrics registry and its text
//! exposition (`metrics`), the `/metrics` HTTP endpoint (`http`) and the one
//! tower layer that counts and times every gRPC call (`grpc`). The binaries
//! decide *what* to measure; this crate only owns *how* it is recorded and
//! served, so both speak the same formats and flags.

pub mod grpc;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod traces;

use std::net::SocketAddr;

pub use logs::LogFormat;
pub use metrics::{metrics, Def, Kind, Registry};

/// The observability flags both binaries take (flattened into their own).
#[derive(Debug, Clone, clap::Args)]
pub struct ObsArgs {
    /// Log line format: `text` (human; colour only on a terminal) or `json`
    /// (one object a line, with the fields of every enclosing span).
    #[arg(long, env = "HOTFLEET_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics at http://ADDR/metrics (off unless given).
    #[arg(long, env = "HOTFLEET_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export traces over OTLP/gRPC to this collector, e.g.
    /// http://127.0.0.1:4317 (default: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
    /// or `OTEL_EXPORTER_OTLP_ENDPOINT`; off when neither is set).
    #[arg(long, env = "HOTFLEET_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// Why observability could not start.
#[derive(Debug, thiserror::Error)]
pub enum ObsError {
    #[error("--metrics-listen {addr}: {source} (in use? pick another address)")]
    Metrics { addr: SocketAddr, source: std::io::Error },
    #[error("--otlp-endpoint: {0}")]
    Traces(#[from] traces::TraceError),
}

/// What [`start`] started; keep it for the process's life and call
/// [`Started::shutdown`] at exit so buffered spans are exported.
pub struct Started {
    /// The bound `/metrics` address, when serving.
    pub metrics: Option<SocketAddr>,
    exporting: Option<traces::Exporting>,
}

impl Started {
    /// Exports what is still buffered, for at most 5 s. The flush blocks, so
    /// it runs on a blocking thread: the exporting task keeps a worker even
    /// on a one-core machine.
    pub async fn shutdown(self) {
        if let Some(exporting) = self.exporting {
            let flush = tokio::task::spawn_blocking(move || exporting.shutdown());
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), flush).await;
        }
    }
}

/// Logs, trace export and the metrics endpoint as `args` say, for the
/// binary `service` (its OpenTelemetry service name) logging to `stream`.
pub async fn start(
    args: &ObsArgs,
    service: &'static str,
    stream: logs::Stream,
    with_target: bool,
) -> Result<Started, ObsError> {
    let exporting = match traces::endpoint(args.otlp_endpoint.as_deref()) {
        Some(endpoint) => Some((traces::Exporting::start(&endpoint, service)?, endpoint)),
        None => None,
    };
    logs::init(args.log_format, stream, with_target, exporting.as_ref().map(|(e, _)| e.tracer()));
    if let Some((_, endpoint)) = &exporting {
        tracing::info!(%endpoint, "exporting traces over OTLP");
    }
    let metrics = match args.metrics_listen {
        Some(addr) => Some(http::start(addr).await.map_err(|source| ObsError::Metrics { addr, source })?),
        None => None,
    };
    Ok(Started { metrics, exporting: exporting.map(|(e, _)| e) })
}
