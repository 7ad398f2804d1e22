//! `hotfleet-coordinator`: flags → config → build → bind → serve until
//! SIGINT/SIGTERM → stop leading (still serving) → stop serving. Everything
//! else is in the library.

use anyhow::Context;
use clap::Parser;
use hotfleet_coordinator::{config::Args, memory, Config, Coordinator};

fn main() -> anyhow::Result<()> {
    let workers = worker_threads();
    // Before the runtime starts its threads (see `memory`).
    let arenas = memory::bound_arenas(workers);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(arenas))
}

async fn run(arenas: memory::Arenas) -> anyhow::Result<()> {
    let args = Args::parse();
    let obs = hotfleet_obs::start(&args.obs, "hotfleet-coordinator", hotfleet_obs::logs::Stream::Stderr, true).await?;
    tracing::debug!(?arenas, "allocator arenas");
    let config = Config::try_from(args)?;
    let listen = config.listen;
    let coordinator = Coordinator::build(config).await.context("starting the coordinator")?;
    hotfleet_coordinator::telemetry::watch(coordinator.cluster().clone(), coordinator.links());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding --listen {listen} (in use? pick another address)"))?;
    coordinator.serve(listener, shutdown_signal()).await.context("serving gRPC")?;
    coordinator.drain().await;
    obs.shutdown().await;
    Ok(())
}

/// tokio's own rule for its workers: `TOKIO_WORKER_THREADS`, else one per
/// core (as the container's CPU limit allows).
fn worker_threads() -> usize {
    std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %err, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
}
