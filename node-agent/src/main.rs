//! `hotfleet-agent`: config -> bind -> serve until SIGINT/SIGTERM -> drain.

use anyhow::Context;
use clap::Parser;
use hotfleet_agent::{server, AgentConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = AgentConfig::parse();
    let obs = hotfleet_obs::start(&config.obs, "hotfleet-agent", hotfleet_obs::logs::Stream::Stderr, false).await?;
    if obs.metrics.is_some() {
        hotfleet_agent::telemetry::watch();
    }
    let grpc = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is another agent running? use --listen)", config.listen))?;
    let runtime = server::bind_runtime_socket(&config).with_context(|| {
        format!("cannot create the runtime socket {} (use --runtime-socket)", config.runtime_socket.display())
    })?;
    if let Some(path) = &config.ready_file {
        // With --metrics-listen, its bound address too (port 0 picks one).
        let metrics = obs.metrics.map(|addr| format!(", \"metrics\": \"{addr}\"")).unwrap_or_default();
        let ready = format!(
            "{{\"grpc\": \"{}\", \"socket\": {:?}, \"pid\": {}{metrics}}}\n",
            grpc.local_addr()?,
            config.runtime_socket.display().to_string(),
            std::process::id()
        );
        server::write_ready_file(path, &ready)
            .with_context(|| format!("cannot write the ready file {}", path.display()))?;
    }
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        server::wait_for_signal().await;
        tracing::info!("shutting down");
        signal.cancel();
    });
    let socket_path = config.runtime_socket.clone();
    let result = server::serve(config, grpc, runtime, shutdown).await;
    let _ = std::fs::remove_file(&socket_path);
    obs.shutdown().await;
    result.context("hotfleet-agent failed")
}
