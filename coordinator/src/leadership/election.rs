//! The election itself: what a won election hands out ([`Tenure`]), the
//! [`Elector`] contract, the embedded store's [`SoloElector`] and the
//! lease-bound [`LeaseElection`] over an [`ElectionBackend`].

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use tokio::{sync::watch, task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{LeaderInfo, LeaderRecord, LeaderView, LeaseClock, LeaseGuard};
use crate::{clock::now_ms, store::Fence};

/// One won election: the fence every write carries and the guard every
/// command checks.
#[derive(Debug, Clone)]
pub struct Tenure {
    pub fence: Fence,
    pub guard: LeaseGuard,
    lease: Option<i64>,
    clock: Option<LeaseClock>,
}

/// How a coordinator becomes, stays and stops being the writer.
#[async_trait]
pub trait Elector: Send + Sync + 'static {
    /// Returns once this coordinator leads (retrying whatever fails
    /// meanwhile), or `None` once `shutdown` is cancelled.
    async fn campaign(&self, shutdown: &CancellationToken) -> Option<Tenure>;
    /// Keeps the tenure alive. Returns why it was lost (its guard is marked
    /// lost first), or `None` once `shutdown` is cancelled.
    async fn hold(&self, tenure: &mut Tenure, shutdown: &CancellationToken) -> Option<String>;
    /// Gives a tenure up on shutdown so another coordinator leads at once.
    async fn resign(&self, tenure: &Tenure);
    /// Who leads, as this coordinator last saw it.
    fn view(&self) -> watch::Receiver<LeaderView>;
}

/// A tenure renewed by its own task from the moment it is won: a term that
/// takes longer than the lease to start (a large fleet to load, a slow or
/// busy store) must not lose the lease before it has acted once.
pub struct Holding {
    /// The tenure as won (the task renews its own copy; the guard is shared).
    pub tenure: Tenure,
    stop: CancellationToken,
    task: JoinHandle<Option<String>>,
}

impl Holding {
    /// Starts renewing `tenure` now; `shutdown` ends it as `hold` would.
    pub fn start(elector: Arc<dyn Elector>, tenure: Tenure, shutdown: &CancellationToken) -> Self {
        let stop = shutdown.child_token();
        let mut held = tenure.clone();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { elector.hold(&mut held, &stop).await }
        });
        Self { tenure, stop, task }
    }

    /// Waits until the tenure ends: why it was lost, or `None` on shutdown.
    pub async fn ended(&mut self) -> Option<String> {
        match (&mut self.task).await {
            Ok(lost) => lost,
            Err(err) => {
                // The renewals stopped: nothing may act on this lease any more.
                let reason = format!("the lease keeper failed: {err}");
                self.tenure.guard.lose(reason.clone());
                Some(reason)
            }
        }
    }

    /// Stops renewing and gives the tenure up (a term that could not start).
    pub async fn resign(mut self, elector: &dyn Elector) {
        self.stop.cancel();
        self.ended().await;
        elector.resign(&self.tenure).await;
    }
}

// ---- the embedded store: one coordinator, leader from the start ----------------

/// The embedded store's "election": the epoch was taken from the store file
/// at start (a restart out-ranks the previous incarnation); it never ends.
pub struct SoloElector {
    tenure: Mutex<Option<Tenure>>,
    view: watch::Sender<LeaderView>,
}

impl SoloElector {
    pub fn new(fence: Fence, addr: String) -> Self {
        let tenure = Tenure { fence, guard: LeaseGuard::unbounded(fence.epoch), lease: None, clock: None };
        let view = LeaderView { leader: Some(LeaderInfo { addr, epoch: fence.epoch }), this_leads: true };
        Self { tenure: Mutex::new(Some(tenure)), view: watch::Sender::new(view) }
    }
}

#[async_trait]
impl Elector for SoloElector {
    async fn campaign(&self, shutdown: &CancellationToken) -> Option<Tenure> {
        let first = self.tenure.lock().unwrap_or_else(|e| e.into_inner()).take();
        match first {
            Some(tenure) => Some(tenure),
            // One tenure per process: a second would need a new epoch.
            None => {
                shutdown.cancelled().await;
                None
            }
        }
    }

    async fn hold(&self, tenure: &mut Tenure, shutdown: &CancellationToken) -> Option<String> {
        let lost = tenure.guard.lost_token();
        tokio::select! {
            _ = shutdown.cancelled() => None,
            _ = lost.cancelled() => tenure.guard.lost_reason(),
        }
    }

    async fn resign(&self, _tenure: &Tenure) {}

    fn view(&self) -> watch::Receiver<LeaderView> {
        self.view.subscribe()
    }
}

// ---- a lease-bound leader key -------------------------------------------------

/// Why an election backend call failed (transient: the loop retries).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct ElectionError(pub String);

/// The outcome of trying to create the leader key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// This coordinator's key now exists; its create revision is the epoch.
    Won { epoch: u64 },
    /// Another key stands (possibly this process's earlier one).
    Held { holder: Option<LeaderRecord>, epoch: u64, revision: i64 },
}

/// The few key-value and lease operations an election needs.
#[async_trait]
pub trait ElectionBackend: Send + Sync + 'static {
    /// A new lease of `ttl` whole seconds.
    async fn grant(&self, ttl_secs: u64) -> Result<i64, ElectionError>;
    /// Deletes the lease and every key bound to it.
    async fn revoke(&self, lease: i64) -> Result<(), ElectionError>;
    /// Renews the lease; `Ok(None)` when it no longer exists.
    async fn keep_alive(&self, lease: i64) -> Result<Option<u64>, ElectionError>;
    /// Creates the leader key bound to `lease` unless one exists.
    async fn try_acquire(&self, lease: i64, value: &[u8]) -> Result<Acquire, ElectionError>;
    /// Returns once the leader key changed after `revision`, or after `max`.
    async fn wait_change(&self, revision: i64, max: Duration) -> Result<(), ElectionError>;
}

/// Elects one coordinator through a lease-bound key (see the module docs).
pub struct LeaseElection<B> {
    backend: B,
    me: LeaderRecord,
    ttl: Duration,
    view: watch::Sender<LeaderView>,
    /// A lease this process held when it lost a tenure: revoked before the
    /// next campaign, so a key etcd kept alive (an etcd restart renews every
    /// lease) does not block the election for a whole TTL.
    stale_lease: Mutex<Option<i64>>,
}

fn ttl_secs(ttl: Duration) -> u64 {
    ttl.as_secs_f64().ceil().max(1.0) as u64
}

/// Whether an etcd outage was already reported: it is said once when it
/// starts (and once when it ends), not on every retry.
#[derive(Debug, Default)]
struct Outage {
    reported: bool,
}

impl Outage {
    /// True for the first failure since the last success.
    fn first_failure(&mut self) -> bool {
        !std::mem::replace(&mut self.reported, true)
    }

    /// True when a success ends a reported outage.
    fn ended(&mut self) -> bool {
        std::mem::replace(&mut self.reported, false)
    }
}

/// Why `hold` stops waiting.
enum Ended {
    Shutdown,
    Lost(String),
}

impl<B: ElectionBackend> LeaseElection<B> {
    pub fn new(backend: B, addr: String, ttl: Duration) -> Self {
        let me = LeaderRecord { addr, pid: std::process::id(), since_ms: 0 };
        Self { backend, me, ttl, view: watch::Sender::new(LeaderView::default()), stale_lease: Mutex::new(None) }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn stale(&self) -> std::sync::MutexGuard<'_, Option<i64>> {
        self.stale_lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, view: LeaderView) {
        self.view.send_if_modified(|current| {
            let changed = *current != view;
            *current = view;
            changed
        });
    }

    async fn pause(shutdown: &CancellationToken, d: Duration) -> bool {
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// A failed etcd call while campaigning: complain once per outage,
    /// pause, and say whether to retry (false once `shutdown` is cancelled).
    async fn retry_after(
        outage: &mut Outage,
        err: &ElectionError,
        shutdown: &CancellationToken,
        retry: Duration,
    ) -> bool {
        if outage.first_failure() {
            tracing::warn!(error = %err, "cannot reach etcd to campaign; retrying");
        }
        Self::pause(shutdown, retry).await
    }

    /// Runs `step` unless the tenure ends first: shutdown, a loss marked on
    /// the guard, or the lease running out on the local clock (checked in
    /// that order).
    async fn unless_ended<T>(
        &self,
        guard: &LeaseGuard,
        deadline: Instant,
        shutdown: &CancellationToken,
        step: impl std::future::Future<Output = T>,
    ) -> Result<T, Ended> {
        let lost = guard.lost_token();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => Err(Ended::Shutdown),
            _ = lost.cancelled() => Err(Ended::Lost(guard.lost_reason().unwrap_or_else(|| "lost".into()))),
            _ = tokio::time::sleep_until(deadline) => Err(Ended::Lost(self.ran_out())),
            value = step => Ok(value),
        }
    }

    fn ended(&self, tenure: &Tenure, end: Ended) -> Option<String> {
        match end {
            Ended::Shutdown => None,
            Ended::Lost(reason) => self.lost(tenure, reason),
        }
    }

    fn ran_out(&self) -> String {
        format!(
            "the leader lease ({:?}) ran out before it could be renewed (etcd unreachable, or this process was paused)",
            self.ttl
        )
    }

    fn lost(&self, tenure: &Tenure, reason: String) -> Option<String> {
        tenure.guard.lose(reason.clone());
        *self.stale() = tenure.lease;
        self.publish(LeaderView { leader: None, this_leads: false });
        tracing::warn!(epoch = tenure.fence.epoch, %reason, "leadership lost: stopped acting at once");
        Some(reason)
    }
}

#[async_trait]
impl<B: ElectionBackend> Elector for LeaseElection<B> {
    async fn campaign(&self, shutdown: &CancellationToken) -> Option<Tenure> {
        let retry = (self.ttl / 6).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut outage = Outage::default();
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let stale = *self.stale();
            if let Some(old) = stale {
                match self.backend.revoke(old).await {
                    Ok(()) => *self.stale() = None,
                    Err(err) => {
                        if !Self::retry_after(&mut outage, &err, shutdown, retry).await {
                            return None;
                        }
                        continue;
                    }
                }
            }
            let sent_at = Instant::now();
            let attempt = async {
                let lease = self.backend.grant(ttl_secs(self.ttl)).await?;
                let me = LeaderRecord { since_ms: now_ms(), ..self.me.clone() };
                let value = serde_json::to_vec(&me).map_err(|e| ElectionError(e.to_string()))?;
                match self.backend.try_acquire(lease, &value).await {
                    Ok(outcome) => Ok((lease, outcome)),
                    Err(err) => {
                        let _ = self.backend.revoke(lease).await;
                        Err(err)
                    }
                }
            };
            let (lease, outcome) = tokio::select! {
                _ = shutdown.cancelled() => return None,
                result = attempt => match result {
                    Ok(r) => r,
                    Err(err) => {
                        if !Self::retry_after(&mut outage, &err, shutdown, retry).await {
                            return None;
                        }
                        continue;
                    }
                },
            };
            outage.ended();
            match outcome {
                Acquire::Won { epoch } => {
                    let clock = LeaseClock::granted(sent_at, self.ttl);
                    let guard = LeaseGuard::with_deadline(epoch, Some(clock.valid_until()));
                    self.publish(LeaderView {
                        leader: Some(LeaderInfo { addr: self.me.addr.clone(), epoch }),
                        this_leads: true,
                    });
                    tracing::info!(epoch, lease, ttl = ?self.ttl, "elected leader");
                    return Some(Tenure { fence: Fence { epoch }, guard, lease: Some(lease), clock: Some(clock) });
                }
                Acquire::Held { holder, epoch, revision } => {
                    // Not ours to keep alive while we wait.
                    let _ = self.backend.revoke(lease).await;
                    let leader = holder.map(|h| LeaderInfo { addr: h.addr, epoch });
                    self.publish(LeaderView { leader, this_leads: false });
                    let wait = self.backend.wait_change(revision, self.ttl.max(Duration::from_secs(1)));
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        result = wait => if let Err(err) = result {
                            tracing::debug!(error = %err, "watching the leader key failed; polling");
                            if !Self::pause(shutdown, retry).await {
                                return None;
                            }
                        },
                    }
                }
            }
        }
    }

    async fn hold(&self, tenure: &mut Tenure, shutdown: &CancellationToken) -> Option<String> {
        let (Some(lease), Some(mut clock)) = (tenure.lease, tenure.clock) else {
            return self.lost(tenure, "tenure without a lease".into());
        };
        let mut outage = Outage::default();
        loop {
            let deadline = clock.valid_until();
            let renewal = tokio::time::sleep_until(clock.next_renewal());
            if let Err(end) = self.unless_ended(&tenure.guard, deadline, shutdown, renewal).await {
                return self.ended(tenure, end);
            }
            let sent_at = Instant::now();
            let renewal = self.backend.keep_alive(lease);
            let renewed = match self.unless_ended(&tenure.guard, deadline, shutdown, renewal).await {
                Ok(renewed) => renewed,
                Err(end) => return self.ended(tenure, end),
            };
            match renewed {
                Ok(Some(ttl)) => {
                    clock.renewed(sent_at, Duration::from_secs(ttl));
                    tenure.clock = Some(clock);
                    tenure.guard.extend(clock.valid_until());
                    if outage.ended() {
                        tracing::info!("leader lease renewed again");
                    }
                }
                Ok(None) => {
                    return self
                        .lost(tenure, "etcd expired the leader lease (another coordinator may lead now)".into());
                }
                Err(err) => {
                    if outage.first_failure() {
                        tracing::warn!(error = %err, "cannot renew the leader lease; retrying until it would expire");
                    }
                    clock.renewal_failed(Instant::now());
                }
            }
        }
    }

    async fn resign(&self, tenure: &Tenure) {
        tenure.guard.lose("resigned (shutting down)");
        if let Some(lease) = tenure.lease {
            // Revoking deletes the leader key: a follower takes over now, not
            // a TTL from now.
            match tokio::time::timeout(Duration::from_secs(3), self.backend.revoke(lease)).await {
                Ok(Ok(())) => tracing::info!(epoch = tenure.fence.epoch, "resigned leadership"),
                _ => tracing::warn!("could not resign in time; the lease expires on its own"),
            }
        }
        self.publish(LeaderView { leader: None, this_leads: false });
    }

    fn view(&self) -> watch::Receiver<LeaderView> {
        self.view.subscribe()
    }
}
