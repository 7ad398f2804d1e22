//! Who may write: the leader election, the lease behind it, and the guards
//! that tie every state write and every agent command to that lease.
//!
//! - [`Elector`] hands out [`Tenure`]s: `campaign` returns once this
//!   coordinator leads, `hold` keeps the lease alive and returns the moment it
//!   is lost, `resign` gives it up on shutdown. [`Holding`] runs `hold` from
//!   the moment an election is won, while the term is still starting. The embedded store's
//!   [`SoloElector`] leads at once and forever (one coordinator per store);
//!   [`LeaseElection`] campaigns for a lease-bound key through an
//!   [`ElectionBackend`] ([`EtcdElection`] against etcd; the unit tests in
//!   `tests.rs` use an in-memory double).
//! - The epoch of a tenure is the **create revision of the leader key**:
//!   unique per tenure, higher for every later tenure (etcd revisions only
//!   grow), and exactly what the etcd store compares inside every write
//!   transaction, so a deposed leader's write lands nothing.
//! - [`LeaseClock`] judges the lease on this process's monotonic clock, from
//!   the moment each renewal was *sent* (etcd counts from when it received
//!   it, later), less a safety margin: the local view expires before etcd's.
//!   A process paused past its lease (GC, SIGSTOP) wakes up already expired.
//! - [`LeaseGuard`] is the tenure's shared flag. [`GuardedAgents`] refuses to
//!   send a command once the lease is expired or lost (and marks it lost, so
//!   the term stops); [`TermStore`] refuses every write once the term is lost
//!   and turns a fenced write into a loss. Agents refuse older epochs on
//!   their side: three independent fences.
//!
//! Files: `lease.rs` (the clock and the guard), `election.rs` (electors),
//! `etcd.rs` (the etcd wire code), `guards.rs` (the term's agents and store).

mod election;
mod etcd;
mod guards;
mod lease;

use serde::{Deserialize, Serialize};

pub use election::{Acquire, ElectionBackend, ElectionError, Elector, Holding, LeaseElection, SoloElector, Tenure};
pub use etcd::{EtcdBackend, EtcdElection};
pub use guards::{GuardedAgents, TermStore};
pub use lease::{LeaseClock, LeaseGuard};

/// The leader as clients are told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderInfo {
    /// Where operators and agents reach it (`--advertise-addr`).
    pub addr: String,
    /// Its fencing epoch (0 when not known).
    pub epoch: u64,
}

/// What a coordinator knows about leadership right now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderView {
    /// The current leader, if known (this coordinator itself while it leads).
    pub leader: Option<LeaderInfo>,
    pub this_leads: bool,
}

/// The value of the leader key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderRecord {
    pub addr: String,
    #[serde(default)]
    pub pid: u32,
    #[serde(default)]
    pub since_ms: u64,
}

#[cfg(test)]
mod tests;
