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

use std::{sync::Arc, time::Duration};

use hotfleet_proto::{
    pushback,
    v1::{HeartbeatRequest, RegisterRequest},
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
    loop {
        for _ in 0..=LEADER_HOPS {
            let status = reporter.node_status(budget).await;
            let (addr, mut client) = coordinators.current();
            let result = if registered {
                let mut request = tonic::Request::new(HeartbeatRequest { node: Some(status) });
                request.set_timeout(timeout);
                client.heartbeat(request).await.map(|r| {
                    let r = r.into_inner();
                    if !r.known {
                        tracing::info!(coordinator = %addr, "coordinator does not know this node; registering again");
                        registered = false;
                    }
                    (r.epoch, r.live_rollouts)
                })
            } else {
                let mut request = tonic::Request::new(RegisterRequest { node: Some(status) });
                request.set_timeout(timeout);
                client.register(request).await.map(|r| {
                    let r = r.into_inner();
                    tracing::info!(node = %identity.node_id, coordinator = %addr, epoch = r.epoch, "registered with the coordinator");
                    registered = true;
                    registered_once.send_replace(true);
                    (r.epoch, r.live_rollouts)
                })
            };
            match result {
                Ok((epoch, live_rollouts)) => {
                    crate::telemetry::heartbeat_answered();
                    follow_leader(participant, epoch, &live_rollouts);
                    if !reachable {
                        tracing::info!(coordinator = %addr, "coordinator reachable again");
                        reachable = true;
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
}
