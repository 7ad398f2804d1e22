//! gRPC adapters: decode the request, call the domain, encode the answer.
//! Nothing here decides anything; the one mapping from domain errors to
//! gRPC status codes lives here too.

pub mod convert;
pub mod gateway;
pub mod limits;
pub mod operator;
mod spec;

use hotfleet_patch::PatchError;
use tonic::{Code, Status};

use crate::{
    auth::Caller, error::Error, patch_plan::PlanRefusal, planner::PlanError, registry::RegistryError, store::StoreError,
};

/// Metadata key on a follower's refusal naming the leader's address, so
/// agents and the CLI can follow it without parsing the message.
pub const LEADER_HEADER: &str = "x-hotfleet-leader";

/// The caller the server's gate attached to a request. Every request of
/// the operator and agent services has one (the gate refuses the rest); a
/// handler reached without one was wired without the gate, and refuses.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, Status> {
    request.extensions().get::<Caller>().cloned().ok_or_else(|| Status::unauthenticated("no authenticated caller"))
}

/// The audit actor of a request: its caller's identity, from the credential
/// (never from a header the client sets), bounded and printable since it
/// lands in the audit log verbatim.
pub fn actor<T>(request: &tonic::Request<T>) -> Result<String, Status> {
    Ok(caller(request)?.actor().chars().filter(|c| !c.is_control()).take(128).collect())
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::NotFound { .. } => Code::NotFound,
            Error::InvalidArgument(_) | Error::Input(_) => Code::InvalidArgument,
            Error::Patch(p) => match p {
                PatchError::Unsigned { .. } | PatchError::UntrustedSigner { .. } | PatchError::BadSignature { .. } => {
                    Code::PermissionDenied
                }
                PatchError::Key { .. } => Code::FailedPrecondition,
                _ => Code::InvalidArgument,
            },
            Error::Plan(PlanError::NoTargets { .. }) => Code::FailedPrecondition,
            Error::PatchPlan(PlanRefusal::Agent(_)) => Code::Unavailable,
            Error::PatchPlan(_) => Code::FailedPrecondition,
            Error::Plan(_) => Code::InvalidArgument,
            Error::Transition(_)
            | Error::Stack(_)
            | Error::Conflict { .. }
            | Error::NodeBusy { .. }
            | Error::Frozen { .. } => Code::FailedPrecondition,
            Error::Registry(RegistryError::Invalid(_) | RegistryError::Input(_)) => Code::InvalidArgument,
            Error::Registry(RegistryError::Store(StoreError::TooLarge(_))) | Error::Store(StoreError::TooLarge(_)) => {
                Code::FailedPrecondition
            }
            Error::Registry(RegistryError::Store(_)) | Error::Store(_) | Error::ShuttingDown => Code::Unavailable,
            // A known leader: refused, go there. No leader yet: try again soon.
            Error::NotLeader { leader: Some(_), .. } => Code::FailedPrecondition,
            Error::NotLeader { leader: None, .. } => Code::Unavailable,
        };
        if matches!(&err, Error::Store(StoreError::Corrupt { .. })) {
            tracing::error!(error = %err, "state store returned a corrupt record");
        }
        let mut status = Status::new(code, err.to_string());
        if let Error::NotLeader { leader: Some(leader), .. } = &err {
            if let Ok(value) = tonic::metadata::MetadataValue::try_from(leader.addr.as_str()) {
                status.metadata_mut().insert(LEADER_HEADER, value);
            }
        }
        status
    }
}

impl From<RegistryError> for Status {
    fn from(err: RegistryError) -> Self {
        Error::from(err).into()
    }
}
