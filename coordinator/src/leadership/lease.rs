//! The lease on this process's own clock ([`LeaseClock`]) and the tenure's
//! shared "may I still act?" flag ([`LeaseGuard`]) every guard checks.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Judges a lease on the local monotonic clock (pure: tests drive it with
/// explicit instants).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseClock {
    ttl: Duration,
    valid_until: Instant,
    next_renewal: Instant,
}

impl LeaseClock {
    /// Time taken off the TTL: covers clock-rate drift between this host and
    /// etcd's and the moment the term needs to stop its work.
    pub fn margin(ttl: Duration) -> Duration {
        (ttl / 10).max(Duration::from_millis(100)).min(ttl / 2)
    }

    /// A lease granted by a request sent at `sent_at`.
    pub fn granted(sent_at: Instant, ttl: Duration) -> Self {
        Self { ttl, valid_until: sent_at + ttl - Self::margin(ttl), next_renewal: sent_at + ttl / 3 }
    }

    /// A renewal sent at `sent_at` was acknowledged with `ttl`.
    pub fn renewed(&mut self, sent_at: Instant, ttl: Duration) {
        self.ttl = ttl;
        self.valid_until = self.valid_until.max(sent_at + ttl - Self::margin(ttl));
        self.next_renewal = sent_at + ttl / 3;
    }

    /// A renewal failed at `now`: try again soon (validity is unchanged).
    pub fn renewal_failed(&mut self, now: Instant) {
        self.next_renewal = now + (self.ttl / 6).max(Duration::from_millis(100));
    }

    pub fn valid_at(&self, now: Instant) -> bool {
        now < self.valid_until
    }

    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    pub fn next_renewal(&self) -> Instant {
        self.next_renewal
    }
}

// ---- the guard shared by a term ---------------------------------------------

#[derive(Debug)]
struct GuardState {
    /// `None`: no deadline (the embedded store's single coordinator).
    valid_until: Option<Instant>,
    lost: Option<String>,
}

/// A tenure's shared "may I still act?" flag. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LeaseGuard {
    epoch: u64,
    state: Arc<Mutex<GuardState>>,
    lost: CancellationToken,
}

impl LeaseGuard {
    /// A guard without a deadline: lost only when told so.
    pub fn unbounded(epoch: u64) -> Self {
        Self::with_deadline(epoch, None)
    }

    pub(super) fn with_deadline(epoch: u64, valid_until: Option<Instant>) -> Self {
        Self {
            epoch,
            state: Arc::new(Mutex::new(GuardState { valid_until, lost: None })),
            lost: CancellationToken::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GuardState> {
        // Every critical section is a plain field update: never half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(super) fn extend(&self, until: Instant) {
        let mut state = self.lock();
        if state.lost.is_none() {
            state.valid_until = Some(until);
        }
    }

    /// Ends the tenure (idempotent; the first reason is kept).
    pub fn lose(&self, reason: impl Into<String>) {
        {
            let mut state = self.lock();
            if state.lost.is_none() {
                state.lost = Some(reason.into());
            }
        }
        self.lost.cancel();
    }

    /// Why the tenure ended, if it did (explicitly; see [`Self::check`]).
    pub fn lost_reason(&self) -> Option<String> {
        self.lock().lost.clone()
    }

    /// `Ok` while the lease is valid on the local clock and not lost; an
    /// expired lease is marked lost here, so everything else stops too.
    pub fn check(&self) -> Result<(), String> {
        let expired = {
            let state = self.lock();
            if let Some(reason) = &state.lost {
                return Err(reason.clone());
            }
            state.valid_until.is_some_and(|until| Instant::now() >= until)
        };
        if expired {
            self.lose("the leader lease expired before it could be renewed");
            return Err(self.lost_reason().unwrap_or_default());
        }
        Ok(())
    }

    /// Cancelled when the tenure ends.
    pub fn lost_token(&self) -> CancellationToken {
        self.lost.clone()
    }
}
