//! The coordinators this agent may talk to, and the one it follows now.
//!
//! `--coordinator` takes one address or a comma-separated list (an HA trio
//! on etcd). Registration and heartbeats must reach the leader: a follower
//! refuses them with the leader's address in the `x-hotfleet-leader`
//! response metadata, and the agent switches to that address at once; a
//! coordinator that cannot be reached (or answers that nobody leads yet)
//! makes the agent move on to the next configured one. Patch downloads are
//! reads any coordinator serves, so they simply try each in turn.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use hotfleet_obs::grpc::{Grpc, GrpcLayer};
use hotfleet_proto::{address::endpoint_url, tls::Transport, v1::agent_gateway_client::AgentGatewayClient};
use tonic::{transport::Channel, Code, Status};
use tower::Layer as _;

/// The agent's client of a coordinator, every call counted and timed.
pub type GatewayClient = AgentGatewayClient<Grpc<Channel>>;

fn gateway(channel: Channel) -> GatewayClient {
    AgentGatewayClient::new(GrpcLayer::client().layer(channel))
}

/// Metadata key a follower names the leader in (the coordinator's `LEADER_HEADER`).
pub const LEADER_HEADER: &str = "x-hotfleet-leader";

#[derive(Debug, thiserror::Error)]
#[error("coordinator address {addr:?} is invalid: {reason}")]
pub struct BadAddress {
    pub addr: String,
    pub reason: String,
}

/// How to reach a coordinator: the transport, and with TLS the identity its
/// certificate must carry (whatever address it was reached at).
#[derive(Debug, Clone)]
pub struct Dial {
    pub transport: Transport,
    pub coordinator_identity: String,
}

impl Dial {
    /// Plaintext (tests, `--insecure`).
    pub fn insecure() -> Self {
        Dial { transport: Transport::Insecure, coordinator_identity: String::new() }
    }

    fn channel(&self, addr: &str) -> Result<Channel, BadAddress> {
        let endpoint = self
            .transport
            .endpoint(addr, &self.coordinator_identity)
            .map_err(|reason| BadAddress { addr: addr.to_string(), reason })?;
        Ok(endpoint.connect_timeout(Duration::from_secs(3)).tcp_nodelay(true).connect_lazy())
    }
}

struct State {
    dial: Dial,
    configured: Vec<(String, Channel)>,
    /// Index into `configured` of the last one tried from the list.
    next: usize,
    /// Who heartbeats go to now (a configured one, or a leader a follower named).
    current: (String, Channel),
}

/// Shared by the heartbeat loop and the patch downloader; cheap to clone.
#[derive(Clone)]
pub struct Coordinators {
    state: Arc<Mutex<State>>,
}

/// What to do after a failed call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// A follower named the leader: retry there at once.
    Leader(String),
    /// Try the next configured coordinator after the usual pause.
    Rotate(String),
}

impl Coordinators {
    /// From `--coordinator` (one address or a comma-separated list).
    pub fn parse(list: &str, dial: Dial) -> Result<Self, BadAddress> {
        let mut configured = Vec::new();
        for addr in list.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            configured.push((endpoint_url(addr), dial.channel(addr)?));
        }
        let Some(first) = configured.first().cloned() else {
            return Err(BadAddress { addr: list.to_string(), reason: "no address given".into() });
        };
        Ok(Self { state: Arc::new(Mutex::new(State { dial, configured, next: 0, current: first })) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain field updates only: a poisoned lock holds consistent data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The coordinator followed now.
    pub fn current(&self) -> (String, GatewayClient) {
        let state = self.lock();
        (state.current.0.clone(), gateway(state.current.1.clone()))
    }

    /// The coordinator followed now, as its bare channel (a relay forwards
    /// agents' calls on it as they came).
    pub fn current_channel(&self) -> (String, Channel) {
        self.lock().current.clone()
    }

    /// Every configured coordinator, the followed one first (for reads).
    pub fn all(&self) -> Vec<(String, GatewayClient)> {
        let state = self.lock();
        let mut out = vec![(state.current.0.clone(), gateway(state.current.1.clone()))];
        for (addr, ch) in &state.configured {
            if *addr != state.current.0 {
                out.push((addr.clone(), gateway(ch.clone())));
            }
        }
        out
    }

    /// After `status` from `from`: follow the leader it names, or move on.
    pub fn after_error(&self, from: &str, status: &Status) -> Next {
        let leader = status
            .metadata()
            .get(LEADER_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(endpoint_url)
            .filter(|leader| status.code() == Code::FailedPrecondition && leader != from);
        let mut state = self.lock();
        if state.current.0 != from {
            // Someone else already moved on.
            return Next::Rotate(state.current.0.clone());
        }
        if let Some(leader) = leader {
            let known = state.configured.iter().find(|(a, _)| *a == leader).map(|(_, c)| c.clone());
            if let Some(ch) = known.or_else(|| state.dial.channel(&leader).ok()) {
                state.current = (leader.clone(), ch);
                return Next::Leader(leader);
            }
        }
        state.next = (state.next + 1) % state.configured.len();
        state.current = state.configured[state.next].clone();
        Next::Rotate(state.current.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_naming(leader: &str) -> Status {
        let mut status = Status::failed_precondition("follower");
        status.metadata_mut().insert(LEADER_HEADER, leader.parse().expect("ascii"));
        status
    }

    #[tokio::test]
    async fn follows_a_named_leader_and_rotates_otherwise() {
        let c = Coordinators::parse("127.0.0.1:1, http://127.0.0.1:2,127.0.0.1:3", Dial::insecure()).expect("parse");
        assert_eq!(c.current().0, "http://127.0.0.1:1");
        assert_eq!(
            c.after_error("http://127.0.0.1:1", &Status::unavailable("down")),
            Next::Rotate("http://127.0.0.1:2".into())
        );
        assert_eq!(
            c.after_error("http://127.0.0.1:2", &refused_naming("http://127.0.0.1:3")),
            Next::Leader("http://127.0.0.1:3".into())
        );
        assert_eq!(c.current().0, "http://127.0.0.1:3");
        // A leader outside the list is followed too (its advertised address).
        assert_eq!(
            c.after_error("http://127.0.0.1:3", &refused_naming("http://10.0.0.9:7700")),
            Next::Leader("http://10.0.0.9:7700".into())
        );
        // It dies: back to the list, which wraps around.
        assert_eq!(
            c.after_error("http://10.0.0.9:7700", &Status::unavailable("gone")),
            Next::Rotate("http://127.0.0.1:3".into())
        );
        assert_eq!(
            c.after_error("http://127.0.0.1:3", &Status::unavailable("gone")),
            Next::Rotate("http://127.0.0.1:1".into())
        );
        assert_eq!(c.all().len(), 3);
    }

    #[test]
    fn an_empty_list_is_refused() {
        assert!(Coordinators::parse(" , ", Dial::insecure()).is_err());
    }
}
