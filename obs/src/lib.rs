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
}
