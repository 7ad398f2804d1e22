//! Answers a late-starting runtime's `stack_query` from the coordinator's
//! fleet patch stack, every bundle verified like a prepare.

use hotfleet_patch::Bundle;
use hotfleet_proto::v1::{runtime_frame::Body, StackPatch, StackReply};

use crate::{patches::PatchSource, sessions::StackProvider};

/// The [`StackProvider`] backed by the coordinator (through [`PatchSource`]).
pub struct CoordinatorStacks {
    pub patches: PatchSource,
}

impl StackProvider for CoordinatorStacks {
    fn stack_for(&self, build: String) -> futures::future::BoxFuture<'static, Body> {
        let patches = self.patches.clone();
        Box::pin(async move {
            match patches.stack(&build).await {
                Ok(stack) => Body::StackReply(StackReply {
                    patches: stack
                        .into_iter()
                        .map(|(patch, bundle): (_, Bundle)| StackPatch {
                            patch_id: patch.patch_id,
                            modules: bundle.modules.into_iter().collect(),
                        })
                        .collect(),
                }),
                Err(err) => {
                    tracing::warn!(build = %build, error = %err, "cannot serve a runtime's patch stack");
                    Body::Error(hotfleet_proto::v1::ProtocolError {
                        message: format!("patch stack unavailable: {err}"),
                        code: "unavailable".into(),
                    })
                }
            }
        })
    }
}
