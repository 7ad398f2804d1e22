//! Log set-up: one subscriber for both binaries, `RUST_LOG` filtering
//! (default `info`), text or JSON lines. Colour only when the log stream is
//! a terminal: a log file or a pipe gets plain text, never ANSI codes.
//!
//! Lines about a rollout or a node carry its id because the code that acts
//! for them runs inside a span with `rollout`/`node` fields: text lines show
//! the span chain (`rollout{rollout=r1}:node{node=n1}: ...`), JSON lines the
//! same fields under `spans` and `span`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

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
/// lines (the coordinator's habit; the agent leaves them out).
pub fn init(format: LogFormat, stream: Stream, with_target: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(with_target);
    // `with_writer` changes the builder's type; one arm per stream and format.
    let result = match (format, stream) {
        (LogFormat::Text, Stream::Stdout) => {
            builder.with_ansi(stream.is_terminal()).with_writer(std::io::stdout).try_init()
        }
        (LogFormat::Text, Stream::Stderr) => {
            builder.with_ansi(stream.is_terminal()).with_writer(std::io::stderr).try_init()
        }
        (LogFormat::Json, Stream::Stdout) => json(builder).with_writer(std::io::stdout).try_init(),
        (LogFormat::Json, Stream::Stderr) => json(builder).with_writer(std::io::stderr).try_init(),
    };
    if let Err(err) = result {
        // Only when something installed a subscriber first (tests): keep it.
        eprintln!("log set-up skipped: {err}");
    }
}

type Builder = tracing_subscriber::fmt::SubscriberBuilder<
    tracing_subscriber::fmt::format::DefaultFields,
    tracing_subscriber::fmt::format::Format,
    EnvFilter,
>;

fn json(
    builder: Builder,
) -> tracing_subscriber::fmt::SubscriberBuilder<
    tracing_subscriber::fmt::format::JsonFields,
    tracing_subscriber::fmt::format::Format<tracing_subscriber::fmt::format::Json>,
    EnvFilter,
> {
    // JSON is for machines: never colour, always the enclosing spans' fields.
    builder.json().with_ansi(false).with_current_span(true).with_span_list(true)
}
