//! What the calls of an attached stream (`AgentGateway.Attach`) stand for,
//! and its first message.

use std::time::Duration;

use tonic::{Status, Streaming};

use crate::v1::{agent_answer::Answer, agent_call::Call, AgentAnswer};

/// The full paths of the agent's own attached stream and of a relay's
/// stream of many agents (what a gate or a relay matches on).
pub const ATTACH_PATH: &str = "/hotfleet.v1.AgentGateway/Attach";
pub const ATTACH_RELAYED_PATH: &str = "/hotfleet.v1.AgentGateway/AttachRelayed";

/// How long an attaching agent has to say who it is.
pub const HELLO_WAIT: Duration = Duration::from_secs(10);

/// The attaching agent's first message, its hello naming the node it
/// speaks for (the whole message, as a relay carries it on), and that node.
pub async fn hello(answers: &mut Streaming<AgentAnswer>) -> Result<(AgentAnswer, String), Status> {
    let first = tokio::time::timeout(HELLO_WAIT, answers.message())
        .await
        .map_err(|_| {
            Status::deadline_exceeded("no hello within 10 s: an attaching agent first says which node it is")
        })??
        .ok_or_else(|| Status::invalid_argument("the stream ended before the hello"))?;
    match &first.answer {
        Some(Answer::Hello(hello)) => {
            let node_id = hello.node_id.clone();
            Ok((first, node_id))
        }
        _ => Err(Status::invalid_argument("the first message on Attach must be the hello naming the node")),
    }
}

/// The `Agent` method a call carried down an attached stream stands for
/// (the path a dialled call would have), for metrics and traces.
pub fn method_of(call: &Call) -> &'static str {
    match call {
        Call::Prepare(_) => "/hotfleet.v1.Agent/Prepare",
        Call::Commit(_) => "/hotfleet.v1.Agent/Commit",
        Call::Abort(_) => "/hotfleet.v1.Agent/Abort",
        Call::Rollback(_) => "/hotfleet.v1.Agent/Rollback",
        Call::Health(_) => "/hotfleet.v1.Agent/Health",
    }
}
