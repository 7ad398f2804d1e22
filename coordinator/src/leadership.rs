//! Who may write: the leader election, the lease behind it, and the guards
//! that tie every state write and every agent command to that lease.
//!
//! - [`Elector`] hands out [`Tenure`]s: `campaign` returns once this
//!   coordinator leads, `hold` keeps the lease alive and returns the moment it
//!   is lost, `resign` gives it up on shutdown. The embedded store's
//!   [`SoloElector`] leads at once and forever (one coordinator per store);
//!   [`LeaseElection`] campaigns for a lease-bound key through an
//!   [`ElectionBackend`] ([`EtcdElection`] against etcd; the unit tests below
//!   use an in-memory double).
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

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    agents::{AgentClient, AgentError, Command, HealthSample, Outcome, Target},
    clock::now_ms,
    rollout::{NodeState, Rollout},
    store::{AuditEntry, Batch, Fence, FreezeRecord, NodeRecord, PatchRecord, StackEntry, Store, StoreError},
};

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

// ---- the lease, on our own clock ----------------------------------------------

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

    fn with_deadline(epoch: u64, valid_until: Option<Instant>) -> Self {
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

    fn extend(&self, until: Instant) {
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

/// [`LeaseElection`] against etcd.
pub type EtcdElection = LeaseElection<EtcdBackend>;

fn ttl_secs(ttl: Duration) -> u64 {
    ttl.as_secs_f64().ceil().max(1.0) as u64
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
        let mut complained = false;
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            let stale = *self.stale();
            if let Some(old) = stale {
                match self.backend.revoke(old).await {
                    Ok(()) => *self.stale() = None,
                    Err(err) => {
                        if !complained {
                            tracing::warn!(error = %err, "cannot reach etcd to campaign; retrying");
                            complained = true;
                        }
                        if !Self::pause(shutdown, retry).await {
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
                        if !complained {
                            tracing::warn!(error = %err, "cannot reach etcd to campaign; retrying");
                            complained = true;
                        }
                        if !Self::pause(shutdown, retry).await {
                            return None;
                        }
                        continue;
                    }
                },
            };
            complained = false;
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
        let lost = tenure.guard.lost_token();
        let mut complained = false;
        loop {
            let deadline = clock.valid_until();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                _ = lost.cancelled() => {
                    let reason = tenure.guard.lost_reason().unwrap_or_else(|| "lost".into());
                    return self.lost(tenure, reason);
                }
                _ = tokio::time::sleep_until(deadline) => return self.lost(tenure, self.ran_out()),
                _ = tokio::time::sleep_until(clock.next_renewal()) => {}
            }
            let sent_at = Instant::now();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                _ = lost.cancelled() => {
                    let reason = tenure.guard.lost_reason().unwrap_or_else(|| "lost".into());
                    return self.lost(tenure, reason);
                }
                _ = tokio::time::sleep_until(deadline) => return self.lost(tenure, self.ran_out()),
                renewed = self.backend.keep_alive(lease) => match renewed {
                    Ok(Some(ttl)) => {
                        clock.renewed(sent_at, Duration::from_secs(ttl));
                        tenure.clock = Some(clock);
                        tenure.guard.extend(clock.valid_until());
                        if complained {
                            tracing::info!("leader lease renewed again");
                            complained = false;
                        }
                    }
                    Ok(None) => {
                        return self.lost(tenure, "etcd expired the leader lease (another coordinator may lead now)".into());
                    }
                    Err(err) => {
                        if !complained {
                            tracing::warn!(error = %err, "cannot renew the leader lease; retrying until it would expire");
                            complained = true;
                        }
                        clock.renewal_failed(Instant::now());
                    }
                },
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

/// [`ElectionBackend`] on etcd: the leader key `<prefix>leader`, created only
/// if absent, bound to the candidate's lease.
pub struct EtcdBackend {
    client: Client,
    key: String,
    timeout: Duration,
}

impl EtcdBackend {
    pub fn new(client: Client, key: String, timeout: Duration) -> Self {
        Self { client, key, timeout }
    }

    async fn call<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, ElectionError> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ElectionError(format!("etcd {what}: {e}"))),
            Err(_) => Err(ElectionError(format!("etcd {what}: no answer within {} ms", self.timeout.as_millis()))),
        }
    }
}

#[async_trait]
impl ElectionBackend for EtcdBackend {
    async fn grant(&self, ttl_secs: u64) -> Result<i64, ElectionError> {
        let mut client = self.client.clone();
        Ok(self.call("lease grant", client.lease_grant(ttl_secs as i64, None)).await?.id())
    }

    async fn revoke(&self, lease: i64) -> Result<(), ElectionError> {
        let mut client = self.client.clone();
        match self.call("lease revoke", client.lease_revoke(lease)).await {
            Ok(_) => Ok(()),
            // Already gone (expired): that is what revoking wanted.
            Err(err) if err.0.contains("not found") => Ok(()),
            Err(err) => Err(err),
        }
    }

    async fn keep_alive(&self, lease: i64) -> Result<Option<u64>, ElectionError> {
        // One short stream per renewal: nothing long-lived to go stale across
        // an etcd restart.
        let mut client = self.client.clone();
        let renew = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            stream.message().await
        };
        match self.call("lease keep-alive", renew).await? {
            Some(resp) if resp.ttl() > 0 => Ok(Some(resp.ttl() as u64)),
            // TTL 0: etcd no longer knows the lease.
            _ => Ok(None),
        }
    }

    async fn try_acquire(&self, lease: i64, value: &[u8]) -> Result<Acquire, ElectionError> {
        let txn = Txn::new()
            .when(vec![Compare::create_revision(self.key.as_str(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(self.key.as_str(), value.to_vec(), Some(PutOptions::new().with_lease(lease)))])
            .or_else(vec![TxnOp::get(self.key.as_str(), None)]);
        let mut client = self.client.clone();
        let resp = self.call("leader txn", client.txn(txn)).await?;
        if resp.succeeded() {
            let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
            if revision <= 0 {
                return Err(ElectionError("etcd answered without a revision".into()));
            }
            return Ok(Acquire::Won { epoch: revision as u64 });
        }
        let current = resp.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        });
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        Ok(match current {
            Some(kv) => Acquire::Held {
                holder: serde_json::from_slice(kv.value()).ok(),
                epoch: kv.create_revision() as u64,
                revision: revision.max(kv.mod_revision()),
            },
            // Deleted between the compare and the read: try again at once.
            None => Acquire::Held { holder: None, epoch: 0, revision },
        })
    }

    async fn wait_change(&self, revision: i64, max: Duration) -> Result<(), ElectionError> {
        let mut client = self.client.clone();
        let options = WatchOptions::new().with_start_revision(revision + 1);
        let watch = async {
            let mut stream = client.watch(self.key.as_str(), Some(options)).await?;
            while let Some(resp) = stream.message().await? {
                if resp.canceled() {
                    // Compacted past our revision, or etcd went away: re-read.
                    return Ok(());
                }
                if resp.events().iter().any(|e| e.event_type() == EventType::Delete || e.event_type() == EventType::Put)
                {
                    return Ok(());
                }
            }
            Ok::<(), etcd_client::Error>(())
        };
        match tokio::time::timeout(max, watch).await {
            Ok(Ok(())) | Err(_) => Ok(()),
            Ok(Err(e)) => Err(ElectionError(format!("etcd watch: {e}"))),
        }
    }
}

// ---- guards around the term's agents and store ------------------------------

/// The engine's agent client for one term: no command leaves once the lease
/// is expired or lost. Health queries pass: they change nothing, and an
/// expired lease stops the term anyway.
pub struct GuardedAgents {
    inner: Arc<dyn AgentClient>,
    guard: LeaseGuard,
}

impl GuardedAgents {
    pub fn new(inner: Arc<dyn AgentClient>, guard: LeaseGuard) -> Self {
        Self { inner, guard }
    }

    fn admit(&self, to: &Target, what: &str) -> Result<(), AgentError> {
        self.guard.check().map_err(|reason| {
            tracing::warn!(node = %to.node_id, command = what, epoch = self.guard.epoch(), %reason, "command not sent: this coordinator no longer leads");
            AgentError::Refused { node: to.node_id.clone(), reason: format!("not sent: no longer leading ({reason})") }
        })
    }
}

#[async_trait]
impl AgentClient for GuardedAgents {
    async fn prepare(
        &self,
        to: &Target,
        cmd: &Command,
        ttl_seconds: u32,
        deadline: Duration,
    ) -> Result<Outcome, AgentError> {
        self.admit(to, "prepare")?;
        self.inner.prepare(to, cmd, ttl_seconds, deadline).await
    }

    async fn commit(&self, to: &Target, cmd: &Command, deadline: Duration) -> Result<Outcome, AgentError> {
        self.admit(to, "commit")?;
        self.inner.commit(to, cmd, deadline).await
    }

    async fn abort(&self, to: &Target, cmd: &Command, deadline: Duration) -> Result<Outcome, AgentError> {
        self.admit(to, "abort")?;
        self.inner.abort(to, cmd, deadline).await
    }

    async fn rollback(&self, to: &Target, cmd: &Command, deadline: Duration) -> Result<Outcome, AgentError> {
        self.admit(to, "rollback")?;
        self.inner.rollback(to, cmd, deadline).await
    }

    async fn health(
        &self,
        to: &Target,
        since: &BTreeMap<String, u64>,
        deadline: Duration,
    ) -> Result<Vec<HealthSample>, AgentError> {
        self.inner.health(to, since, deadline).await
    }
}

/// The store as one term sees it: refuses every write once the term is lost
/// (nothing still in flight gets recorded, e.g. the failures of commands the
/// guard refused), and a fenced write ends the term at once. Whether the
/// lease still holds is decided by the store itself (etcd's transaction
/// compare), not by this process's clock.
pub struct TermStore {
    inner: Arc<dyn Store>,
    guard: LeaseGuard,
}

impl TermStore {
    pub fn new(inner: Arc<dyn Store>, guard: LeaseGuard) -> Self {
        Self { inner, guard }
    }
}

#[async_trait]
impl Store for TermStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn write(&self, fence: Fence, batch: Batch) -> Result<Vec<u64>, StoreError> {
        if let Some(reason) = self.guard.lost_reason() {
            return Err(StoreError::NotLeading { epoch: fence.epoch, reason });
        }
        let result = self.inner.write(fence, batch).await;
        if let Err(StoreError::Fenced { ours, current }) = &result {
            tracing::error!(
                ours,
                current,
                "write refused by the store: fenced by a newer leader (transaction compare failed)"
            );
            self.guard.lose(format!("fenced: epoch {current} now owns the store"));
        }
        result
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.inner.nodes().await
    }

    async fn patch(&self, patch_id: &str) -> Result<Option<PatchRecord>, StoreError> {
        self.inner.patch(patch_id).await
    }

    async fn patch_bundle(&self, patch_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.patch_bundle(patch_id).await
    }

    async fn patches(&self) -> Result<Vec<PatchRecord>, StoreError> {
        self.inner.patches().await
    }

    async fn rollout(&self, rollout_id: &str) -> Result<Option<Rollout>, StoreError> {
        self.inner.rollout(rollout_id).await
    }

    async fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.inner.rollouts().await
    }

    async fn rollout_nodes(&self, rollout_id: &str) -> Result<BTreeMap<String, NodeState>, StoreError> {
        self.inner.rollout_nodes(rollout_id).await
    }

    async fn patch_stack(&self, target_build: &str) -> Result<Vec<StackEntry>, StoreError> {
        self.inner.patch_stack(target_build).await
    }

    async fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        self.inner.audit(limit).await
    }

    async fn freeze(&self) -> Result<Option<FreezeRecord>, StoreError> {
        self.inner.freeze().await
    }
}

#[cfg(test)]
mod tests;
