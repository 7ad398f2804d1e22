//! `hotfleet-fleet-sim`: the fleet-scale benchmark (issue 11). Starts the
//! real `hotfleet-coordinator` (embedded store or a local etcd), hosts N
//! simulated agents in this process (see `sim.rs` for what is simulated),
//! pushes two signed patches and runs rollouts with the real `hotfleet` CLI,
//! and prints medians of several runs. See bench/README.md.

mod measure;
mod report;
mod run;
mod sim;
mod timeline;

use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context, Result};
use clap::Parser;
use sim::{Attach, DigestProtocol};

#[derive(Debug, Parser)]
#[command(
    name = "hotfleet-fleet-sim",
    about = "Fleet-scale benchmark: the real coordinator and CLI against N simulated agents"
)]
struct Args {
    /// Simulated nodes (one process each).
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    /// Runs to take medians of (each on a fresh coordinator and store).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// `embedded` or `etcd` (an etcd on loopback, started from the PATH).
    #[arg(long, default_value = "embedded")]
    store: String,
    /// Smoke run: 100 nodes, one run.
    #[arg(long)]
    quick: bool,
    /// Where `hotfleet-coordinator` and `hotfleet` are [default: beside this binary].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Seconds between heartbeats (told to the coordinator, kept by the agents).
    #[arg(long, default_value_t = 2)]
    heartbeat_seconds: u64,
    /// Connections the simulated agents share for register/heartbeat/fetch.
    #[arg(long, default_value_t = 64)]
    heartbeat_conns: usize,
    /// Agents call through this many real `hotfleet-relay` processes, each
    /// agent on a connection of its own to its relay (the shape of a fleet
    /// behind relays); 0: straight to the coordinator over --heartbeat-conns.
    #[arg(long, default_value_t = 0)]
    relays: usize,
    /// The simulated agents do not attach: the coordinator dials each one
    /// (the path of agents that predate `AgentGateway.Attach`).
    #[arg(long, conflicts_with = "own_streams")]
    dial: bool,
    /// Each simulated agent on a shared connection attaches on a stream of
    /// its own (`AgentGateway.Attach`, as an agent straight to the
    /// coordinator does) rather than as a relay carries agents, one
    /// `AttachRelayed` stream per connection (the figures before the
    /// fifteenth part).
    #[arg(long)]
    own_streams: bool,
    /// Modules each simulated process reports a digest of (status size: ~100 bytes each);
    /// a real game has dozens to hundreds. 0 reproduces the figures before the eleventh part.
    #[arg(long, default_value_t = 32)]
    modules: usize,
    /// Every heartbeat carries every module digest, as agents did before they
    /// left out those the leader holds (the figures before the thirteenth part).
    #[arg(long, conflicts_with = "whole_maps")]
    full_digests: bool,
    /// A changed map is sent whole rather than named by its fingerprint, as
    /// agents did before fingerprints (the figures before the fourteenth part).
    #[arg(long)]
    whole_maps: bool,
    /// Completing rollouts after the two measured ones (each a new patch on
    /// top), printing the coordinator's RSS after each: does it keep growing?
    #[arg(long, default_value_t = 0)]
    more_rollouts: u32,
    #[arg(long, default_value = "50ms")]
    health_window: String,
    #[arg(long, default_value = "20%,40%,60%,80%,100%")]
    waves: String,
    /// Keep each run's directory (coordinator log, store) and print where.
    #[arg(long)]
    keep: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (nodes, runs) = if args.quick { (100, 1) } else { (args.nodes, args.runs.max(1)) };
    if nodes < 2 {
        bail!("--nodes must be at least 2 (a canary and a wave)");
    }
    let etcd = match args.store.as_str() {
        "embedded" => false,
        "etcd" => true,
        other => bail!("--store must be embedded or etcd, not {other}"),
    };
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?.parent().map(PathBuf::from).context("locating this binary")?,
    };
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let plan = run::Plan {
        nodes,
        etcd,
        bin_dir,
        repo,
        heartbeat: Duration::from_secs(args.heartbeat_seconds.max(1)),
        heartbeat_conns: args.heartbeat_conns,
        relays: args.relays,
        attach: match (args.dial, args.own_streams) {
            (true, _) => Attach::Dial,
            (false, true) => Attach::OwnStreams,
            (false, false) => Attach::Relayed,
        },
        digests: match (args.full_digests, args.whole_maps) {
            (true, _) => DigestProtocol::Full,
            (false, true) => DigestProtocol::WholeMaps,
            (false, false) => DigestProtocol::Fingerprints,
        },
        modules: args.modules,
        more_rollouts: args.more_rollouts,
        health_window: args.health_window,
        waves: args.waves,
        keep: args.keep,
    };
    // The coordinator logs at warn: info lines per node would be part of what is measured.
    if std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "warn");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let mut results = Vec::new();
    for i in 0..runs {
        eprintln!("run {}/{runs}: {nodes} nodes, {} store", i + 1, args.store);
        let result = runtime.block_on(run::run_once(&plan))?;
        eprintln!(
            "  rollout {} ms, rollback {} ms",
            result.rollout.wall_ms,
            result.rollback.timeline.rollback_ms.unwrap_or(0)
        );
        results.push(result);
    }
    report::print(nodes, &args.store, &results);
    Ok(())
}
