//! Registration and heartbeats. The coordinator vanishing is not an error the
//! agent can fix: it logs once per state change and keeps trying, serving its
//! runtimes all the while.
//!
//! With several coordinators the agent follows the leader (see
//! [`crate::coordinators`]): a follower's refusal names the leader and the
//! next attempt goes there at once. Every answer from the leader carries its
//! epoch, which the agent records as its fencing floor right away: a deposed
//! coordinator that wakes up later is refused even by agents the new leader
//! has not sent a command to yet.

use std::{sync::Arc, time::Duration};

use hotfleet_proto::v1::{HeartbeatRequest, RegisterRequest};
use tokio_util::sync::CancellationToken;

use crate::{
    coordinators::{Coordinators, Next},
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

pub async fn run(
    coordinators: Coordinators,
    reporter: Arc<NodeReporter>,
    interval: Duration,
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
                    r.epoch
                })
            } else {
                let mut request = tonic::Request::new(RegisterRequest { node: Some(status) });
                request.set_timeout(timeout);
                client.register(request).await.map(|r| {
                    let r = r.into_inner();
                    tracing::info!(node = %identity.node_id, coordinator = %addr, epoch = r.epoch, "registered with the coordinator");
                    registered = true;
                    r.epoch
                })
            };
            match result {
                Ok(epoch) => {
                    if let Err(err) = participant.observe_epoch(epoch) {
                        tracing::warn!(error = %err, "cannot record the leader's epoch");
                    }
                    if !reachable {
                        tracing::info!(coordinator = %addr, "coordinator reachable again");
                        reachable = true;
                    }
                    break;
                }
                Err(status) => {
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
            // An expired prepare is reported at once, not an interval later.
            _ = participant.changed() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
