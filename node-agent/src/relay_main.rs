//! `hotfleet-relay`: config -> bind -> relay until SIGINT/SIGTERM.

use anyhow::Context;
use clap::Parser;
use hotfleet_agent::relay::{self, RelayConfig};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let config = RelayConfig::parse();
    let mut runtime = match config.worker_threads {
        // One thread: no hand-offs between threads for a call's several tasks.
        1 => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if config.worker_threads > 1 {
        runtime.worker_threads(config.worker_threads);
    }
    runtime.enable_all().build().context("starting the runtime")?.block_on(relay(config))
}

async fn relay(config: RelayConfig) -> anyhow::Result<()> {
    let obs = hotfleet_obs::start(&config.obs, "hotfleet-relay", hotfleet_obs::logs::Stream::Stderr, false).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (use --listen)", config.listen))?;
    if let Some(path) = &config.ready_file {
        let ready = format!("{{\"grpc\": \"{}\", \"pid\": {}}}\n", listener.local_addr()?, std::process::id());
        hotfleet_agent::server::write_ready_file(path, &ready)
            .with_context(|| format!("cannot write the ready file {}", path.display()))?;
    }
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        hotfleet_agent::server::wait_for_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    let result = relay::serve(&config, listener, shutdown).await;
    obs.shutdown().await;
    result.context("hotfleet-relay failed")
}
