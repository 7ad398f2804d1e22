//! Registration and heartbeats. The coordinator vanishing is not an error the
//! agent can fix: it logs once per state change and keeps trying, serving its
//! runtimes all the while.
//!
//! With several coordinators the agent follows the leader (see
//! [`crate::coordinators`]): a follower's refusal names the leader and the
//! next attempt goes there at once. Every answer from the leader carries its
//! epoch, which the agent records as its fencing floor right away: a deposed
//! coordinator that wakes up later is refused even by agents the new leader
//! has not sent a command to yet. These answers are the only way the epoch
//! rises (a command's epoch field never raises it): a command naming a newer
//! epoch wakes this loop for an immediate heartbeat that learns it.
//!
//! A leader too busy to take the registration now (a registration storm)
//! answers with when to come back ([`hotfleet_proto::pushback`]): the agent
//! waits that long, jittered so the refused agents spread out, and asks the
//! same coordinator again; it is not a reason to try another coordinator.
//!
//! The leader's answer also lists the unfinished rollouts it drives on this
//! node; their prepared patches are renewed for another TTL, so a prepare
//! lives as long as its rollout while a leader answers, and presumed abort
//! comes a TTL after the last leader went silent.
//!
//! A process's module digests (most of a heartbeat's size: ~3.5 KB with 32
//! modules) are sent only when the leader does not hold them yet: once a
//! leader has answered a heartbeat or registration carrying them, later
//! heartbeats to it mark them unchanged and leave them out ([`HeldDigests`]);
//! a new leader, a new epoch or an answer asking for them (`send_digests`)
//! sends them all again. A map the leader does not hold yet (a patch landed,
//! or a registration) goes by its fingerprint first: a fleet on one stack
//! runs one map, which the leader holds once one process sent it whole.

use std::{collections::HashMap, sync::Arc, time::Duration};

use hotfleet_proto::{
    pushback,
    v1::{HeartbeatRequest, NodeStatus, RegisterRequest},
};
use tokio_util::sync::CancellationToken;

use crate::{
    coordinators::{Coordinators, Next},
    participant::Participant,
    reports::NodeReporter,
};

/// Immediate retries after a follower named the leader, per heartbeat tick.
const LEADER_HOPS: usize = 3;

/// A heartbeat that takes longer than this is given up: a coordinator that
/// hangs (paused, partitioned) must not keep the agent from finding the
/// leader before the leader declares it lost.
fn call_timeout(interval: Duration) -> Duration {
    (interval * 2).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// How long a heartbeat waits for the node's processes to answer: what has
/// not answered by then is reported from the cache, so a stuck process costs
/// a heartbeat this much at most, never the node its liveness.
fn status_budget(interval: Duration) -> Duration {
    (interval / 2).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// A leader answered with its `epoch` and the rollouts it drives here:
/// record the epoch as the fencing floor, then renew those rollouts'
/// prepares, but only if no newer leader has been seen (a deposed leader
/// that still answers keeps nothing alive).
fn follow_leader(participant: &Participant, epoch: u64, live_rollouts: &[String]) {
    if let Err(err) = participant.observe_epoch(epoch) {
        tracing::warn!(error = %err, "cannot record the leader's epoch");
    }
    if epoch < participant.highest_epoch() {
        return;
    }
    for rollout_id in live_rollouts {
        participant.renew(rollout_id);
    }
}

/// The module digests of each process the coordinator followed now holds:
/// those it took in an answered heartbeat or registration, under its epoch.
#[derive(Debug)]
pub struct HeldDigests {
    coordinator: String,
    epoch: u64,
    by_process: HashMap<String, HashMap<String, String>>,
    /// The last answer asked for the maps: the next status carries them whole.
    send_whole: bool,
    /// A map the leader does not hold goes by fingerprint first (off: whole,
    /// as agents did before fingerprints; the benchmark's comparison).
    by_fingerprint: bool,
}

impl Default for HeldDigests {
    fn default() -> Self {
        Self::new(true)
    }
}

/// A status about to be sent: the digests it stands for, whichever it carries.
pub struct Outgoing {
    coordinator: String,
    epoch: u64,
    digests: HashMap<String, HashMap<String, String>>,
    named: bool,
}

impl Outgoing {
    /// Whether some map went by fingerprint alone.
    pub fn named(&self) -> bool {
        self.named
    }
}

impl HeldDigests {
    fn new(by_fingerprint: bool) -> Self {
        Self { coordinator: String::new(), epoch: 0, by_process: HashMap::new(), send_whole: false, by_fingerprint }
    }

    /// Maps not held are always sent whole (the protocol before fingerprints).
    pub fn without_fingerprints() -> Self {
        Self::new(false)
    }

    /// Leaves out of `status` the digests `coordinator` holds already (marked
    /// unchanged), names a map it does not hold by fingerprint (the leader
    /// likely has it from another process on the same stack), and returns
    /// what the status stands for (to remember once answered).
    pub fn strip(&self, coordinator: &str, status: &mut NodeStatus) -> Outgoing {
        let mut digests = HashMap::with_capacity(status.processes.len());
        let mut named = false;
        for process in &mut status.processes {
            let held = self.coordinator == coordinator
                && self.by_process.get(&process.process_id) == Some(&process.live_digests);
            let full = if held {
                process.live_digests_unchanged = true;
                std::mem::take(&mut process.live_digests)
            } else if self.by_fingerprint && !self.send_whole && !process.live_digests.is_empty() {
                process.live_digests_fingerprint = hotfleet_proto::digests::fingerprint(&process.live_digests);
                named = true;
                std::mem::take(&mut process.live_digests)
            } else {
                process.live_digests.clone()
            };
            digests.insert(process.process_id.clone(), full);
        }
        Outgoing { coordinator: coordinator.to_string(), epoch: self.epoch, digests, named }
    }

    /// `sent` was answered under `epoch`: the coordinator holds its digests,
    /// unless it asked for them (the next status sends them whole) or is a
    /// new term (which holds none).
    pub fn answered(&mut self, sent: Outgoing, epoch: u64, send_digests: bool) {
        let by_fingerprint = self.by_fingerprint;
        if send_digests || (sent.epoch != 0 && epoch != sent.epoch) {
            *self = HeldDigests { send_whole: send_digests, ..Self::new(by_fingerprint) };
            return;
        }
        *self =
            HeldDigests { coordinator: sent.coordinator, epoch, by_process: sent.digests, ..Self::new(by_fingerprint) };
    }

    /// Nothing is held (no answer, or the next call goes to a registration);
    /// maps asked for are still sent whole.
    pub fn forget(&mut self) {
        *self = HeldDigests { send_whole: self.send_whole, ..Self::new(self.by_fingerprint) };
    }
}

/// Registers and heartbeats until `shutdown`; `registered` turns true once
/// a coordinator has taken this node's registration (the attached stream
/// waits for it: in a registration storm it would only add to the load).
pub async fn run(
    coordinators: Coordinators,
    reporter: Arc<NodeReporter>,
    interval: Duration,
    registered_once: tokio::sync::watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut registered = false;
    let mut reachable = true;
    let timeout = call_timeout(interval);
    let budget = status_budget(interval);
    let (participant, identity) = (reporter.participant(), reporter.identity());
    let mut held = HeldDigests::default();
    loop {
        for _ in 0..=LEADER_HOPS {
            let mut status = reporter.node_status(budget).await;
            let (addr, mut client) = coordinators.current();
            if !registered {
                held.forget();
            }
            let sent = held.strip(&addr, &mut status);
            let result = if registered {
                let mut request = tonic::Request::new(HeartbeatRequest { node: Some(status) });
                request.set_timeout(timeout);
                client.heartbeat(request).await.map(|r| {
                    let r = r.into_inner();
                    if !r.known {
                        tracing::info!(coordinator = %addr, "coordinator does not know this node; registering again");
                        registered = false;
                    }
                    (r.epoch, r.live_rollouts, r.send_digests || !r.known)
                })
            } else {
                let mut request = tonic::Request::new(RegisterRequest { node: Some(status) });
                request.set_timeout(timeout);
                client.register(request).await.map(|r| {
                    let r = r.into_inner();
                    tracing::info!(node = %identity.node_id, coordinator = %addr, epoch = r.epoch, "registered with the coordinator");
                    registered = true;
                    registered_once.send_replace(true);
                    (r.epoch, r.live_rollouts, r.send_digests)
                })
            };
            match result {
                Ok((epoch, live_rollouts, send_digests)) => {
                    // A map named by fingerprint the leader lacks goes whole now, not an interval later.
                    let again = send_digests && sent.named();
                    held.answered(sent, epoch, send_digests);
                    crate::telemetry::heartbeat_answered();
                    follow_leader(participant, epoch, &live_rollouts);
                    if !reachable {
                        tracing::info!(coordinator = %addr, "coordinator reachable again");
                        reachable = true;
                    }
                    if again {
                        continue;
                    }
                    break;
                }
                Err(status) => {
                    if let Some(wait) = pushback::wait_of(&status) {
                        let wait = pushback::jittered(wait);
                        tracing::info!(coordinator = %addr, wait_ms = wait.as_millis() as u64, "coordinator busy with registrations; registering again after the wait it asked for");
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => continue,
                            _ = shutdown.cancelled() => return,
                        }
                    }
                    // The next coordinator must hear a registration first.
                    registered = false;
                    match coordinators.after_error(&addr, &status) {
                        Next::Leader(leader) => {
                            tracing::info!(follower = %addr, %leader, "following the leader");
                            continue;
                        }
                        Next::Rotate(next) => {
                            if reachable {
                                tracing::warn!(coordinator = %addr, error = %status.message(), code = ?status.code(), %next, "coordinator unreachable or not leading; trying the next one");
                            }
                            reachable = false;
                            break;
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            // An expired prepare is reported at once, not an interval later;
            // a command naming an unlearned epoch gets its heartbeat now.
            _ = participant.changed() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::rig;

    #[tokio::test]
    async fn the_leaders_answer_renews_its_live_rollouts_and_a_deposed_leaders_does_not() {
        let rig = rig(&["a"]);
        let live = ["r1".to_string()];
        rig.participant.observe_epoch(1).expect("epoch");
        rig.prepare_for(Duration::from_millis(300)).await;
        let deadline = |rig: &crate::testing::Rig| rig.participant.prepared()[0].expires_at;
        let first = deadline(&rig);
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Another rollout listed: this one is not renewed.
        follow_leader(&rig.participant, 1, &["ro-other".to_string()]);
        assert_eq!(deadline(&rig), first);
        follow_leader(&rig.participant, 1, &live);
        let renewed = deadline(&rig);
        assert!(renewed > first, "the leader's answer renews the prepare");
        // A newer leader has been seen: the old one's answer keeps nothing alive.
        rig.participant.observe_epoch(3).expect("epoch");
        tokio::time::sleep(Duration::from_millis(20)).await;
        follow_leader(&rig.participant, 2, &live);
        assert_eq!(deadline(&rig), renewed);
        assert_eq!(rig.participant.highest_epoch(), 3, "an older epoch never lowers the floor");
        // Renewed past its first TTL, the prepare is still there to commit.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            follow_leader(&rig.participant, 3, &live);
            rig.participant.expire_prepared().await;
        }
        assert_eq!(rig.participant.prepared().len(), 1, "600 ms of renewals outlive a 300 ms TTL");
        // The leader stops listing it: presumed abort one TTL later.
        tokio::time::sleep(Duration::from_millis(400)).await;
        rig.participant.expire_prepared().await;
        assert!(rig.participant.prepared().is_empty());
        assert_eq!(rig.participant.recently_expired().len(), 1);
    }

    fn status(digests: &[(&str, &str)]) -> NodeStatus {
        NodeStatus {
            node_id: "n1".into(),
            processes: vec![hotfleet_proto::v1::ProcessStatus {
                process_id: "p".into(),
                live_digests: digests.iter().map(|(m, d)| (m.to_string(), d.to_string())).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// What a status carried for its one process: (unchanged, whole map's size, fingerprint).
    fn carried(held: &HeldDigests, addr: &str, digests: &[(&str, &str)]) -> ((bool, usize, String), Outgoing) {
        let mut s = status(digests);
        let sent = held.strip(addr, &mut s);
        let p = &s.processes[0];
        ((p.live_digests_unchanged, p.live_digests.len(), p.live_digests_fingerprint.clone()), sent)
    }

    #[test]
    fn digests_the_leader_holds_are_left_out_and_others_named_until_it_asks_for_them_whole() {
        let mut held = HeldDigests::default();
        let v1 = [("game.a", "aa"), ("game.b", "bb")];
        let v2 = [("game.a", "a2"), ("game.b", "bb")];
        let name = |d: &[(&str, &str)]| {
            let map: HashMap<String, String> = d.iter().map(|(m, v)| (m.to_string(), v.to_string())).collect();
            hotfleet_proto::digests::fingerprint(&map)
        };
        let (what, sent) = carried(&held, "c1", &v1);
        assert_eq!(what, (false, 0, name(&v1)), "nothing held yet: named by fingerprint");
        assert!(sent.named());
        held.answered(sent, 7, false);
        let (what, sent) = carried(&held, "c1", &v1);
        assert_eq!(what, (true, 0, String::new()), "held: left out");
        assert!(!sent.named());
        held.answered(sent, 7, false);
        let (what, _) = carried(&held, "c1", &v2);
        assert_eq!(what, (false, 0, name(&v2)), "changed (a patch landed): named");
        let (what, _) = carried(&held, "c2", &v1);
        assert!(!what.0, "another coordinator holds nothing of ours");

        // The leader lacks the map named (or a new term holds none): whole, once.
        let (_, sent) = carried(&held, "c1", &v2);
        held.answered(sent, 7, true);
        let (what, sent) = carried(&held, "c1", &v2);
        assert_eq!(what, (false, 2, String::new()), "asked for: sent whole");
        held.answered(sent, 7, false);
        assert_eq!(carried(&held, "c1", &v2).0, (true, 0, String::new()));
        // Asked, then registering again (the node was unknown): still whole.
        let (_, sent) = carried(&held, "c1", &v2);
        held.answered(sent, 7, true);
        held.forget();
        assert_eq!(carried(&held, "c1", &v2).0, (false, 2, String::new()));
        // A new epoch at the same address is a new term: it holds none.
        let (_, sent) = carried(&held, "c1", &v1);
        held.answered(sent, 7, false);
        let (_, sent) = carried(&held, "c1", &v1);
        held.answered(sent, 8, false);
        assert_eq!(carried(&held, "c1", &v1).0, (false, 0, name(&v1)));
        // Registering again names them again.
        let (_, sent) = carried(&held, "c1", &v1);
        held.answered(sent, 8, false);
        held.forget();
        assert_eq!(carried(&held, "c1", &v1).0, (false, 0, name(&v1)));

        // Without fingerprints (the protocol before them), a map not held goes whole.
        let mut old = HeldDigests::without_fingerprints();
        let (what, sent) = carried(&old, "c1", &v1);
        assert_eq!(what, (false, 2, String::new()));
        old.answered(sent, 7, false);
        assert_eq!(carried(&old, "c1", &v1).0, (true, 0, String::new()));
        old.forget();
        assert_eq!(carried(&old, "c1", &v1).0, (false, 2, String::new()));
    }
}
