//! Leadership without etcd: the lease clock, the guard, and the election loop
//! against an in-memory backend that behaves like etcd's leases and
//! create-if-absent key (time is tokio's paused clock, so TTLs pass at once).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::{
    agents::{AgentClient, AgentError, Command, CommandKind, GrpcAgents, HealthSample, Outcome, Target},
    store::{embedded::EmbeddedStore, Batch, Store, StoreError, Write},
};
use hotfleet_proto::tls::Transport;

const TTL: Duration = Duration::from_secs(3);

#[derive(Default)]
struct FakeState {
    revision: i64,
    next_lease: i64,
    leases: HashMap<i64, (Instant, u64)>,
    /// (value, create revision, lease)
    key: Option<(Vec<u8>, i64, i64)>,
    down: bool,
}

impl FakeState {
    /// What etcd's lessor does on its own: expired leases go, with their key.
    fn expire(&mut self) {
        let now = Instant::now();
        self.leases.retain(|_, (until, _)| *until > now);
        if let Some((_, _, lease)) = &self.key {
            if !self.leases.contains_key(lease) {
                self.key = None;
                self.revision += 1;
            }
        }
    }
}

#[derive(Clone, Default)]
struct Fake {
    state: Arc<Mutex<FakeState>>,
    keep_alives: Arc<AtomicUsize>,
}

impl Fake {
    fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        let mut state = self.state.lock().expect("fake state");
        state.expire();
        f(&mut state)
    }

    fn set_down(&self, down: bool) {
        self.with(|s| s.down = down);
    }

    /// etcd restarted: every lease gets its full TTL again.
    fn renew_all_leases(&self) {
        self.with(|s| {
            for (until, ttl) in s.leases.values_mut() {
                *until = Instant::now() + Duration::from_secs(*ttl);
            }
        });
    }

    fn leader_lease(&self) -> Option<i64> {
        self.with(|s| s.key.as_ref().map(|(_, _, lease)| *lease))
    }
}

fn down() -> ElectionError {
    ElectionError("etcd unreachable".into())
}

#[async_trait]
impl ElectionBackend for Fake {
    async fn grant(&self, ttl_secs: u64) -> Result<i64, ElectionError> {
        self.with(|s| {
            if s.down {
                return Err(down());
            }
            s.next_lease += 1;
            let id = s.next_lease;
            s.leases.insert(id, (Instant::now() + Duration::from_secs(ttl_secs), ttl_secs));
            Ok(id)
        })
    }

    async fn revoke(&self, lease: i64) -> Result<(), ElectionError> {
        self.with(|s| {
            if s.down {
                return Err(down());
            }
            s.leases.remove(&lease);
            s.expire();
            Ok(())
        })
    }

    async fn keep_alive(&self, lease: i64) -> Result<Option<u64>, ElectionError> {
        self.keep_alives.fetch_add(1, Ordering::Relaxed);
        self.with(|s| {
            if s.down {
                return Err(down());
            }
            Ok(s.leases.get_mut(&lease).map(|(until, ttl)| {
                *until = Instant::now() + Duration::from_secs(*ttl);
                *ttl
            }))
        })
    }

    async fn try_acquire(&self, lease: i64, value: &[u8]) -> Result<Acquire, ElectionError> {
        self.with(|s| {
            if s.down {
                return Err(down());
            }
            s.revision += 1;
            match &s.key {
                None => {
                    s.key = Some((value.to_vec(), s.revision, lease));
                    Ok(Acquire::Won { epoch: s.revision as u64 })
                }
                Some((value, create, _)) => Ok(Acquire::Held {
                    holder: serde_json::from_slice(value).ok(),
                    epoch: *create as u64,
                    revision: s.revision,
                }),
            }
        })
    }

    async fn wait_change(&self, revision: i64, max: Duration) -> Result<(), ElectionError> {
        let until = Instant::now() + max;
        loop {
            let current = self.with(|s| s.key.as_ref().map(|(_, create, _)| *create));
            // Changed: gone, or a key created after the one we saw.
            if current.is_none_or(|create| create > revision) || Instant::now() >= until {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn election(fake: &Fake, addr: &str) -> LeaseElection<Fake> {
    LeaseElection::new(fake.clone(), addr.to_string(), TTL)
}

#[test]
fn the_lease_clock_expires_before_etcd_does() {
    let t0 = Instant::now();
    let mut clock = LeaseClock::granted(t0, TTL);
    assert_eq!(LeaseClock::margin(TTL), Duration::from_millis(300));
    assert!(clock.valid_at(t0 + Duration::from_millis(2699)));
    assert!(!clock.valid_at(t0 + Duration::from_millis(2700)), "expires a margin before etcd's TTL");
    assert_eq!(clock.next_renewal(), t0 + Duration::from_secs(1));
    // Renewals count from when they were sent, never backwards.
    clock.renewed(t0 + Duration::from_secs(1), TTL);
    assert_eq!(clock.valid_until(), t0 + Duration::from_millis(3700));
    clock.renewed(t0 + Duration::from_millis(500), TTL);
    assert_eq!(clock.valid_until(), t0 + Duration::from_millis(3700));
    clock.renewal_failed(t0 + Duration::from_secs(2));
    assert_eq!(clock.next_renewal(), t0 + Duration::from_millis(2500));
    assert_eq!(LeaseClock::margin(Duration::from_secs(60)), Duration::from_secs(6));
}

#[tokio::test(start_paused = true)]
async fn the_guard_refuses_once_expired_or_lost() {
    let guard = LeaseGuard::with_deadline(7, Some(Instant::now() + Duration::from_secs(1)));
    assert!(guard.check().is_ok());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(guard.check().is_err());
    assert!(guard.lost_token().is_cancelled(), "an expired lease ends the term");
    let unbounded = LeaseGuard::unbounded(1);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(unbounded.check().is_ok());
    unbounded.lose("fenced");
    unbounded.lose("second reason");
    assert_eq!(unbounded.lost_reason().as_deref(), Some("fenced"));
}

#[tokio::test(start_paused = true)]
async fn exactly_one_leads_and_the_other_points_at_it() {
    let fake = Fake::default();
    let (a, b) = (Arc::new(election(&fake, "http://a")), Arc::new(election(&fake, "http://b")));
    let shutdown = CancellationToken::new();
    let tenure = a.campaign(&shutdown).await.expect("a leads");
    assert!(a.view().borrow().this_leads);
    let b2 = b.clone();
    let sd = shutdown.clone();
    let follower = tokio::spawn(async move { b2.campaign(&sd).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!follower.is_finished(), "b must not lead while a does");
    let view = b.view().borrow().clone();
    assert!(!view.this_leads);
    assert_eq!(view.leader, Some(LeaderInfo { addr: "http://a".into(), epoch: tenure.fence.epoch }));
    shutdown.cancel();
    assert!(follower.await.expect("join").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_stops_before_its_lease_runs_out() {
    let fake = Fake::default();
    let a = election(&fake, "http://a");
    let shutdown = CancellationToken::new();
    let granted = Instant::now();
    let mut tenure = a.campaign(&shutdown).await.expect("leads");
    fake.set_down(true);
    let reason = a.hold(&mut tenure, &shutdown).await.expect("lost");
    let held = granted.elapsed();
    assert!(reason.contains("ran out before it could be renewed"), "{reason}");
    assert!(held < TTL, "stopped after {held:?}, before etcd would expire the lease");
    assert!(held >= TTL - LeaseClock::margin(TTL));
    assert!(tenure.guard.check().is_err());
    assert!(!a.view().borrow().this_leads);
}

#[tokio::test(start_paused = true)]
async fn renewals_keep_a_leader_and_a_lost_lease_hands_over_with_a_higher_epoch() {
    let fake = Fake::default();
    let (a, b) = (Arc::new(election(&fake, "http://a")), Arc::new(election(&fake, "http://b")));
    let shutdown = CancellationToken::new();
    let mut tenure_a = a.campaign(&shutdown).await.expect("a leads");
    let a2 = a.clone();
    let sd = shutdown.clone();
    let guard_a = tenure_a.guard.clone();
    let holding = tokio::spawn(async move { a2.hold(&mut tenure_a, &sd).await });
    tokio::time::sleep(TTL * 5).await;
    assert!(!holding.is_finished(), "renewed every TTL/3, it keeps leading");
    assert!(fake.keep_alives.load(Ordering::Relaxed) >= 14);
    // etcd drops the lease (e.g. the leader was paused longer than its TTL).
    let lease = fake.leader_lease().expect("a's key");
    fake.revoke(lease).await.expect("revoke");
    let tenure_b = b.campaign(&shutdown).await.expect("b takes over");
    assert!(tenure_b.fence.epoch > guard_a.epoch(), "epochs only grow");
    let reason = holding.await.expect("join").expect("a lost");
    assert!(reason.contains("expired the leader lease"), "{reason}");
    assert!(guard_a.check().is_err());
}

#[tokio::test(start_paused = true)]
async fn a_term_slower_to_start_than_its_lease_still_leads_when_it_is_ready() {
    let fake = Fake::default();
    let a: Arc<LeaseElection<Fake>> = Arc::new(election(&fake, "http://a"));
    let shutdown = CancellationToken::new();
    let tenure = a.campaign(&shutdown).await.expect("a leads");
    let mut holding = Holding::start(a.clone(), tenure, &shutdown);
    // The term loads a large fleet from a busy store: three leases' worth.
    tokio::time::sleep(TTL * 3).await;
    assert!(holding.tenure.guard.check().is_ok(), "renewed while the term started");
    assert!(a.view().borrow().this_leads);
    assert!(fake.keep_alives.load(Ordering::Relaxed) >= 8, "renewed about every TTL/3");
    assert!(fake.leader_lease().is_some(), "etcd still holds a's key");
    shutdown.cancel();
    assert_eq!(holding.ended().await, None, "shutdown ends holding without a loss");
}

#[tokio::test(start_paused = true)]
async fn a_term_that_cannot_start_gives_its_lease_up_at_once() {
    let fake = Fake::default();
    let (a, b) = (Arc::new(election(&fake, "http://a")), election(&fake, "http://b"));
    let shutdown = CancellationToken::new();
    let tenure = a.campaign(&shutdown).await.expect("a leads");
    let epoch = tenure.fence.epoch;
    let holding = Holding::start(a.clone(), tenure, &shutdown);
    let guard = holding.tenure.guard.clone();
    holding.resign(&*a).await;
    assert!(guard.check().is_err(), "nothing acts on a resigned tenure");
    let started = Instant::now();
    let next = b.campaign(&shutdown).await.expect("b takes over");
    assert!(started.elapsed() < TTL, "without waiting for the lease to run out");
    assert!(next.fence.epoch > epoch);
}

#[tokio::test(start_paused = true)]
async fn a_fenced_write_ends_the_tenure_at_once() {
    let fake = Fake::default();
    let a = election(&fake, "http://a");
    let shutdown = CancellationToken::new();
    let mut tenure = a.campaign(&shutdown).await.expect("leads");
    let guard = tenure.guard.clone();
    let started = Instant::now();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        guard.lose("fenced: epoch 99 now owns the store");
    });
    let reason = a.hold(&mut tenure, &shutdown).await.expect("lost");
    assert_eq!(reason, "fenced: epoch 99 now owns the store");
    assert!(started.elapsed() < Duration::from_millis(100));
    // The next campaign revokes that lease first: the key does not linger.
    assert!(a.campaign(&shutdown).await.expect("leads again").fence.epoch > tenure.fence.epoch);
}

#[tokio::test(start_paused = true)]
async fn resigning_hands_over_without_waiting_for_the_ttl() {
    let fake = Fake::default();
    let (a, b) = (Arc::new(election(&fake, "http://a")), Arc::new(election(&fake, "http://b")));
    let shutdown = CancellationToken::new();
    let tenure = a.campaign(&shutdown).await.expect("a leads");
    let b2 = b.clone();
    let sd = shutdown.clone();
    let follower = tokio::spawn(async move { b2.campaign(&sd).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resigned = Instant::now();
    a.resign(&tenure).await;
    let tenure_b = follower.await.expect("join").expect("b leads");
    assert!(resigned.elapsed() < Duration::from_millis(500), "took {:?}", resigned.elapsed());
    assert!(tenure_b.fence.epoch > tenure.fence.epoch);
    assert!(tenure.guard.check().is_err());
}

#[tokio::test(start_paused = true)]
async fn after_an_etcd_restart_the_old_leader_frees_its_own_stale_key() {
    let fake = Fake::default();
    let a = election(&fake, "http://a");
    let shutdown = CancellationToken::new();
    let mut tenure = a.campaign(&shutdown).await.expect("leads");
    fake.set_down(true);
    assert!(a.hold(&mut tenure, &shutdown).await.is_some());
    // etcd comes back and, like a restarted etcd, renews every lease: a's
    // old key would stand for another TTL unless a revokes it.
    fake.set_down(false);
    fake.renew_all_leases();
    assert!(fake.leader_lease().is_some());
    let started = Instant::now();
    let again = a.campaign(&shutdown).await.expect("leads again");
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    assert!(again.fence.epoch > tenure.fence.epoch);
}

#[tokio::test(start_paused = true)]
async fn campaigning_survives_an_unreachable_etcd() {
    let fake = Fake::default();
    fake.set_down(true);
    let a = Arc::new(election(&fake, "http://a"));
    let shutdown = CancellationToken::new();
    let a2 = a.clone();
    let sd = shutdown.clone();
    let campaign = tokio::spawn(async move { a2.campaign(&sd).await });
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!campaign.is_finished());
    fake.set_down(false);
    assert!(campaign.await.expect("join").is_some());
}

#[tokio::test]
async fn the_term_store_refuses_writes_after_a_loss_and_a_fence_ends_the_term() {
    let dir = tempfile::tempdir().expect("tempdir");
    let embedded = Arc::new(EmbeddedStore::open(dir.path()).expect("open"));
    let old = embedded.acquire_epoch().await.expect("epoch");
    let guard = LeaseGuard::unbounded(old.epoch);
    let store = TermStore::new(embedded.clone(), guard.clone());
    let audit = |action: &str| Batch::new().with(Write::Audit(crate::patches::audit("t", action, "", "", true)));
    store.write(old, audit("while leading")).await.expect("write");
    // Another writer takes the store: the next write is fenced and ends the term.
    let _newer = embedded.acquire_epoch().await.expect("epoch");
    assert!(matches!(store.write(old, audit("stale")).await, Err(StoreError::Fenced { .. })));
    assert!(guard.lost_reason().is_some_and(|r| r.contains("fenced")));
    assert!(matches!(store.write(old, audit("after")).await, Err(StoreError::NotLeading { .. })));
    let log: Vec<String> = embedded.audit(10, None).await.expect("audit").into_iter().map(|e| e.action).collect();
    assert_eq!(log, ["while leading"]);
}

#[derive(Default)]
struct CountingAgents {
    sent: AtomicUsize,
}

#[async_trait]
impl AgentClient for CountingAgents {
    async fn send(&self, _: &Target, _: &Command, _: Duration) -> Result<Outcome, AgentError> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        Ok(Outcome { ok: true, ..Outcome::default() })
    }
    async fn health(
        &self,
        _: &Target,
        _: &BTreeMap<String, u64>,
        _: Duration,
    ) -> Result<Vec<HealthSample>, AgentError> {
        Ok(Vec::new())
    }
}

#[tokio::test(start_paused = true)]
async fn no_command_leaves_once_the_lease_expired() {
    let inner = Arc::new(CountingAgents::default());
    let guard = LeaseGuard::with_deadline(5, Some(Instant::now() + Duration::from_secs(1)));
    let agents = GuardedAgents::new(inner.clone(), guard.clone());
    let to = Target { node_id: "n1".into(), addr: "127.0.0.1:1".into() };
    let cmd = Command {
        kind: CommandKind::Commit,
        rollout_id: "r".into(),
        patch_id: "p".into(),
        epoch: 5,
        process_id: String::new(),
        rollout_kind: Default::default(),
    };
    let d = Duration::from_secs(1);
    agents.send(&to, &cmd, d).await.expect("sent while leading");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kinds =
        [CommandKind::Prepare { ttl_seconds: 0 }, CommandKind::Commit, CommandKind::Abort, CommandKind::Rollback];
    for kind in kinds {
        let result = agents.send(&to, &cmd.with_kind(kind), d).await;
        assert!(matches!(result, Err(AgentError::Refused { .. })), "{kind:?} refused");
    }
    assert_eq!(inner.sent.load(Ordering::Relaxed), 1, "nothing sent after the lease expired");
    assert!(agents.health(&to, &BTreeMap::new(), d).await.is_ok(), "reads still pass");
    assert!(guard.lost_token().is_cancelled());
}

#[test]
fn the_guard_keeps_the_inner_clients_bound_on_calls_at_once() {
    let inner = Arc::new(GrpcAgents::new(Duration::from_secs(1), 64, Transport::Insecure));
    let agents = GuardedAgents::new(inner.clone(), LeaseGuard::with_deadline(5, None));
    for fleet in [10, 1_000, 10_000] {
        assert_eq!(agents.width(fleet), inner.width(fleet), "{fleet} agents");
    }
    assert!(agents.width(10_000) < 10_000, "a fan-out over 10,000 agents is bounded");
}
