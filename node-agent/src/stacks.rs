//! Answers a late-starting runtime's `stack_query` from the coordinator's
//! fleet patch stack, every bundle verified like a prepare, and cuts the
//! answer into frames: one piece of a module per `source_part` frame, then the
//! `stack_reply` end marker, so a stack of any size crosses the local socket.

use hotfleet_patch::Bundle;
use hotfleet_proto::{
    parts::source_parts,
    v1::{runtime_frame::Body, ProtocolError, StackPatch, StackReply},
};

use crate::{patches::PatchSource, sessions::StackProvider};

/// One patch of a build's stack: its id and its (module, source) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatchSources {
    pub patch_id: String,
    pub modules: Vec<(String, String)>,
}

/// The frames' bodies answering a `stack_query`, in sending order: the
/// sources' pieces, then the `stack_reply` naming the patches oldest first
/// and counting the pieces (or one `error` if the stack is unavailable).
pub fn reply_bodies(stack: Result<Vec<PatchSources>, String>) -> Vec<Body> {
    let stack = match stack {
        Ok(stack) => stack,
        Err(message) => return vec![Body::Error(ProtocolError { message, code: "unavailable".into() })],
    };
    let mut bodies: Vec<Body> =
        stack.iter().flat_map(|p| source_parts(&p.patch_id, &p.modules)).map(Body::SourcePart).collect();
    let parts = bodies.len() as u32;
    let patches = stack.into_iter().map(|p| StackPatch { patch_id: p.patch_id, modules: Default::default() });
    bodies.push(Body::StackReply(StackReply { patches: patches.collect(), parts }));
    bodies
}

/// The [`StackProvider`] backed by the coordinator (through [`PatchSource`]).
pub struct CoordinatorStacks {
    pub patches: PatchSource,
}

impl StackProvider for CoordinatorStacks {
    fn stack_for(&self, build: String) -> futures::future::BoxFuture<'static, Result<Vec<PatchSources>, String>> {
        let patches = self.patches.clone();
        Box::pin(async move {
            match patches.stack(&build).await {
                Ok(stack) => Ok(stack
                    .into_iter()
                    .map(|(patch, bundle): (_, Bundle)| PatchSources {
                        patch_id: patch.patch_id,
                        modules: bundle.modules,
                    })
                    .collect()),
                Err(err) => {
                    tracing::warn!(build = %build, error = %err, "cannot serve a runtime's patch stack");
                    Err(format!("patch stack unavailable: {err}"))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stack_is_its_pieces_then_the_end_marker_counting_them() {
        let stack = vec![
            PatchSources {
                patch_id: "p1".into(),
                modules: vec![("a".into(), "x = 1\n".into()), ("e".into(), "".into())],
            },
            PatchSources { patch_id: "p2".into(), modules: vec![("a".into(), "x = 2\n".into())] },
        ];
        let bodies = reply_bodies(Ok(stack));
        let pieces: Vec<(String, String, String)> = bodies
            .iter()
            .filter_map(|b| match b {
                Body::SourcePart(p) => Some((p.patch_id.clone(), p.module.clone(), p.text.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            pieces,
            [
                ("p1".into(), "a".into(), "x = 1\n".into()),
                ("p1".into(), "e".into(), String::new()),
                ("p2".into(), "a".into(), "x = 2\n".into())
            ]
        );
        let Some(Body::StackReply(end)) = bodies.last() else { panic!("no end marker: {bodies:?}") };
        assert_eq!(end.parts, 3);
        let ids: Vec<&str> = end.patches.iter().map(|p| p.patch_id.as_str()).collect();
        assert_eq!(ids, ["p1", "p2"]);
        assert!(end.patches.iter().all(|p| p.modules.is_empty()), "sources travel only in pieces");
    }

    #[test]
    fn an_unavailable_stack_is_one_error() {
        let bodies = reply_bodies(Err("patch stack unavailable: no coordinator".into()));
        assert!(
            matches!(&bodies[..], [Body::Error(e)] if e.code == "unavailable" && e.message.contains("no coordinator"))
        );
    }
}
