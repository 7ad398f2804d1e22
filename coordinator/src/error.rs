//! The coordinator's domain error: what operators and agents can be told.
//! The gRPC adapters turn it into a `Status` in exactly one place
//! (`impl From<Error> for Status` in [`crate::grpc`]), so every code and
//! message is decided by this type.

use hotfleet_patch::PatchError;

use crate::{
    input::InputError, leadership::LeaderInfo, patch_plan::PlanRefusal, planner::PlanError, registry::RegistryError,
    rollout::TransitionError, stack::StackError, store::StoreError,
};

/// `Result` with the coordinator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} {} not found", crate::input::excerpt(id))]
    NotFound { what: &'static str, id: String },
    #[error("{0}")]
    InvalidArgument(String),
    /// A field beyond its bound ([`crate::input`]).
    #[error(transparent)]
    Input(#[from] InputError),
    /// An uploaded bundle failed verification.
    #[error("patch refused: {0}")]
    Patch(#[from] PatchError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Transition(#[from] TransitionError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A `patch plan` the fleet cannot give ([`crate::patch_plan`]).
    #[error(transparent)]
    PatchPlan(#[from] PlanRefusal),
    /// A rollout the build's patch stack refuses ([`crate::stack`]).
    #[error(transparent)]
    Stack(#[from] StackError),
    #[error("refused: node(s) {nodes} are already in active rollout {rollout}; wait for it to finish, abort it, or narrow --selector")]
    Conflict { rollout: String, nodes: String },
    #[error("refused: node {node} is in live rollout(s) {rollouts}; wait for them to finish or abort them, then remove the node")]
    NodeBusy { node: String, rollouts: String },
    #[error("refused: the fleet is frozen by {by} ({reason}); run `hotfleet unfreeze` first")]
    Frozen { by: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the coordinator is shutting down; retry against the new instance")]
    ShuttingDown,
    /// A write (or an agent registration) reached a coordinator that does not lead.
    #[error("{}", not_leader(this, leader.as_ref()))]
    NotLeader { this: String, leader: Option<LeaderInfo> },
}

fn not_leader(this: &str, leader: Option<&LeaderInfo>) -> String {
    match leader {
        Some(l) => format!(
            "this coordinator ({this}) is a follower: the leader is {} (epoch {}); send writes there \
             (give the CLI and agents every coordinator, --coordinator a,b,c, and they follow the leader)",
            l.addr, l.epoch
        ),
        None => format!(
            "this coordinator ({this}) is a follower and no coordinator leads right now \
             (election in progress, or etcd unreachable); retry in a few seconds"
        ),
    }
}
