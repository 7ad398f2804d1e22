//! What the calls of an attached stream (`AgentGateway.Attach`) stand for.

use crate::v1::agent_call::Call;

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
