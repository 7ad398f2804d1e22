//! Log set-up: one subscriber for both binaries, `RUST_LOG` filtering
//! (default `info`), text or JSON lines. Colour only when the log stream is
//! a terminal: a log file or a pipe gets plain text, never ANSI codes.
//!
//! Lines about a rollout or a node carry its id because the code that acts
//! for them runs inside a span with `rollout`/`node` fields: text lines show
//! the span chain (`rollout{rollout=r1}:node{node=n1}: ...`), JSON lines the
//! same fields under `spans` and `span`.

use std::io::IsTerminal;

use opentelemetry_sdk::trace::SdkTracer;
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer, Registry};

/// How a log line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Where a binary's log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn is_terminal(self) -> bool {
        match self {
            Stream::Stdout => std::io::stdout().is_terminal(),
            Stream::Stderr => std::io::stderr().is_terminal(),
        }
    }
}

/// Installs the global subscriber. `with_target` keeps module paths in text
/// lines (the coordinator's habit; the agent leaves them out). With a
/// `tracer`, spans are exported too (see `traces`).
pub fn init(format: LogFormat, stream: Stream, with_target: bool, tracer: Option<SdkTracer>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = format == LogFormat::Text && stream.is_terminal();
    let writer = move || -> Box<dyn std::io::Write> {
        match stream {
            Stream::Stdout => Box::new(std::io::stdout()),
            Stream::Stderr => Box::new(std::io::stderr()),
        }
    };
    let lines = fmt::layer().with_target(with_target).with_ansi(ansi).with_writer(writer);
    let lines: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => Box::new(lines),
        // JSON is for machines: always the enclosing spans' fields.
        LogFormat::Json => Box::new(lines.json().with_current_span(true).with_span_list(true)),
    };
    let spans = tracer.map(|t| tracing_opentelemetry::layer().with_tracer(t));
    let result = tracing_subscriber::registry().with(lines).with(spans).with(filter).try_init();
    if let Err(err) = result {
        // Only when something installed a subscriber first (tests): keep it.
        eprintln!("log set-up skipped: {err}");
    }
}
