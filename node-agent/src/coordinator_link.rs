//! Registration and heartbeats. The coordinator vanishing is not an error the
//! agent can fix: it logs once per state change and keeps trying, serving its
//! runtimes all the while.

use std::time::Duration;

use hotfleet_proto::v1::{agent_gateway_client::AgentGatewayClient, HeartbeatRequest, RegisterRequest};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::{
    participant::SharedParticipant,
    service::{node_status, NodeIdentity},
};

pub async fn run(
    mut client: AgentGatewayClient<Channel>,
    participant: SharedParticipant,
    identity: NodeIdentity,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut registered = false;
    let mut reachable = true;
    loop {
        let status = node_status(&participant, &identity).await;
        let result = if registered {
            let mut request = tonic::Request::new(HeartbeatRequest { node: Some(status) });
            request.set_timeout(Duration::from_secs(5));
            client.heartbeat(request).await.map(|r| {
                if !r.get_ref().known {
                    tracing::info!("coordinator does not know this node; registering again");
                    registered = false;
                }
            })
        } else {
            let mut request = tonic::Request::new(RegisterRequest { node: Some(status) });
            request.set_timeout(Duration::from_secs(5));
            client.register(request).await.map(|r| {
                let r = r.into_inner();
                tracing::info!(node = %identity.node_id, epoch = r.epoch, "registered with the coordinator");
                registered = true;
            })
        };
        match result {
            Ok(()) if !reachable => {
                tracing::info!("coordinator reachable again");
                reachable = true;
            }
            Ok(()) => {}
            Err(status) => {
                if reachable {
                    tracing::warn!(error = %status.message(), code = ?status.code(), "coordinator unreachable; will keep retrying");
                }
                reachable = false;
                registered = false;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
