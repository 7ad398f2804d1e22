//! hotfleet node agent: stands between the coordinator and the game processes
//! of one host (or pod).
//!
//! - [`sessions`]: runtime sessions over the local Unix socket (one per game process),
//!   which [`runtime_socket`] creates owner-only and guards by peer uid;
//! - [`runtimes`]: the game processes as the participant sees them (a trait, [`sessions`] behind it);
//! - [`command`]: a command and its answer as domain values;
//! - [`participant`]: the agent's side of the two-phase commit: epoch fencing
//!   ([`epoch`], learned from the coordinator only), idempotent commands
//!   ([`answers`]), replays refused ([`finished`]), prepared patches with a
//!   renewable TTL ([`prepared`], presumed abort);
//! - [`patches`]: patch download from the coordinator, verification, on-disk cache by digest;
//! - [`stacks`]: a late-starting runtime's patch stack, served from the coordinator's;
//! - [`reports`]: node status and per-process health, process statuses cached
//!   ([`process_status`]) so one stuck process never holds up a heartbeat;
//! - [`service`]: the gRPC `Agent` service (adapters only), behind [`guard`]
//!   (only the coordinator's certificate may call it);
//! - [`coordinators`]: the coordinator list, and following the leader among them;
//! - [`coordinator_link`]: registration and heartbeats;
//! - [`attach`]: commands down the agent's own connection to the leader;
//! - [`server`]: wires it all together under one shutdown signal;
//! - [`relay`]: `hotfleet-relay`, which carries many agents' calls to the
//!   coordinator over a few connections.

pub mod answers;
pub mod attach;
pub mod command;
pub mod config;
pub mod coordinator_link;
pub mod coordinators;
pub mod epoch;
pub mod finished;
pub mod guard;
pub mod participant;
pub mod patches;
pub mod prepared;
pub mod process_status;
pub mod relay;
pub mod relay_attach;
pub mod reports;
pub mod runtime_socket;
pub mod runtimes;
pub mod server;
pub mod service;
pub mod sessions;
pub mod stack_rules;
pub mod stacks;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod testing;

pub use config::AgentConfig;

/// Locks a std mutex, tolerating poison: every critical section in the agent
/// is a plain read or update that a panic cannot leave half-done, so keep
/// serving rather than poisoning the whole agent.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
