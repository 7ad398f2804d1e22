//! A local fleet of real processes: `hotfleet-coordinator`s (on the embedded
//! store, or several on an etcd this crate starts on loopback), `hotfleet-agent`s,
//! Python game servers from `examples/` (the zone server, or the asyncio arena), and TCP player clients. `hotfleet demo`
//! and the process-level tests both stand their fleets up with it.
//!
//! Every process is killed when its handle is dropped, so nothing outlives a
//! demo or a test, even one that fails half-way.
//!
//! Every process runs with mutual TLS, certificates from a development CA
//! made with `hotfleet certs dev` (`certs.rs`).
//!
//! One file per kind: `layout.rs` (where binaries, the repository and Python
//! are; the CLI), `proc.rs` (a child process and waiting on it), `artifacts.rs`
//! (keys and patches made with the CLI), `coordinator.rs`, `etcd.rs`,
//! `agent.rs`, `relay.rs`, `zone.rs` (a game server process, of the [`Game`] in `game.rs`),
//! `player.rs`, and `fleet.rs` putting them together.

mod agent;
mod artifacts;
mod certs;
mod coordinator;
mod etcd;
mod fleet;
mod game;
mod layout;
mod player;
mod proc;
mod relay;
mod zone;

use std::{path::PathBuf, time::Duration};

pub use agent::AgentProc;
pub use artifacts::{build_patch_with, Keys, PatchBuild};
pub use certs::{DevCerts, TlsFiles, OPERATORS};
pub use coordinator::{CoordinatorProc, StoreSpec};
pub use etcd::EtcdProc;
pub use fleet::{Backend, Fleet, FleetNode, FleetOptions, RELAY_NAME};
pub use game::Game;
pub use layout::Layout;
pub use player::Player;
pub use proc::{free_port, wait_for, Proc};
pub use relay::RelayProc;
pub use tempfile::TempDir;
pub use zone::ZoneProc;

/// What went wrong starting or talking to a local process.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0} not found: build the workspace first (cargo build --workspace --bins)")]
    MissingBinary(PathBuf),
    #[error("cannot find the hotfleet repository (examples/zone_server): run from inside it")]
    NoRepository,
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out after {after:?} waiting for {what}{}", log.as_ref().map(|l| format!(" (see {})", l.display())).unwrap_or_default())]
    Timeout { what: String, after: Duration, log: Option<PathBuf> },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`hotfleet {args}` failed ({status}): {stderr}")]
    Cli { args: String, status: String, stderr: String },
    #[error("player {name}: {message}")]
    Player { name: String, message: String },
    #[error("etcd not found (looked at $HOTFLEET_ETCD and the PATH): install it, e.g. `apt-get install etcd-server` on Debian (scripts/test-all.sh does)")]
    MissingEtcd,
}

pub type Result<T, E = FleetError> = std::result::Result<T, E>;

/// Wraps an I/O error with what was being done.
fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FleetError {
    let what = what.into();
    move |source| FleetError::Io { what, source }
}
