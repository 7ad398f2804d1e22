//! Who may do what on a coordinator: roles, the caller of a request, and
//! which role each operator method needs. Plain Rust; [`gate`] applies it
//! to every request in the one tower layer the server is built with.
//!
//! Roles are ordered: an admin may do what an operator may, an operator what
//! a viewer may. A caller without a role (an agent's certificate, say) may
//! only ask who it is.

pub mod credentials;
pub mod gate;

use std::fmt;

use hotfleet_proto::tls::PeerCert;

/// An operator's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads: patches, nodes, rollouts, freeze, audit, leader.
    Viewer,
    /// Changes the fleet: push, start, pause, resume, promote, abort, freeze, unfreeze.
    Operator,
    /// Administers hotfleet itself: nodes, keys, tokens.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// `viewer`, `operator` or `admin`.
    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == text.trim())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a caller was recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A client certificate of the configured CA.
    Certificate(PeerCert),
    /// A bearer token found (hashed) in the tokens file.
    Token,
    /// The coordinator runs `--insecure`: nobody is authenticated.
    Insecure,
}

/// The authenticated caller of one request, put in its extensions by the
/// gate: handlers take the audit actor from here, never from a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub role: Option<Role>,
    pub credential: Credential,
}

impl Caller {
    /// Everyone, on an `--insecure` coordinator.
    pub fn insecure() -> Self {
        Caller { name: "insecure".into(), role: Some(Role::Admin), credential: Credential::Insecure }
    }

    /// What the audit log records as the actor.
    pub fn actor(&self) -> &str {
        &self.name
    }

    pub fn credential_name(&self) -> &'static str {
        match self.credential {
            Credential::Certificate(_) => "certificate",
            Credential::Token => "token",
            Credential::Insecure => "insecure",
        }
    }

    /// Whether this caller may register and heartbeat as `node_id`: only
    /// with a certificate naming exactly that node (or when insecure).
    pub fn speaks_for_node(&self, node_id: &str) -> bool {
        match &self.credential {
            Credential::Certificate(cert) => cert.is(node_id),
            Credential::Token => false,
            Credential::Insecure => true,
        }
    }
}

/// What a request must bring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Health and reflection: anyone who completed the handshake.
    Nothing,
    /// Any credential (`WhoAmI`).
    Credential,
    /// An agent's client certificate (`AgentGateway`; the handler then
    /// checks it names the node in the request).
    Certificate,
    /// An operator method.
    Role(Role),
}

const COORDINATOR: &str = "/hotfleet.v1.Coordinator/";
pub(crate) const GATEWAY: &str = "/hotfleet.v1.AgentGateway/";

/// What a request to `path` (`/package.Service/Method`) must bring. An
/// operator method this table does not know needs admin: a new method is
/// closed until someone decides who may call it.
pub fn need(path: &str) -> Need {
    if path.starts_with(GATEWAY) {
        return Need::Certificate;
    }
    let Some(method) = path.strip_prefix(COORDINATOR) else { return Need::Nothing };
    match method {
        "WhoAmI" => Need::Credential,
        "ListPatches" | "GetPatch" | "ListNodes" | "ListRollouts" | "GetRollout" | "WatchRollout" | "GetFreeze"
        | "ListAudit" | "GetLeader" | "ListStack" => Need::Role(Role::Viewer),
        "PushPatch" | "StartRollout" | "PauseRollout" | "ResumeRollout" | "PromoteRollout" | "AbortRollout"
        | "Freeze" | "Unfreeze" | "PlanPatch" => Need::Role(Role::Operator),
        _ => Need::Role(Role::Admin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operator_method_needs_the_documented_role() {
        assert_eq!(need("/hotfleet.v1.Coordinator/ListAudit"), Need::Role(Role::Viewer));
        assert_eq!(need("/hotfleet.v1.Coordinator/ListStack"), Need::Role(Role::Viewer));
        assert_eq!(need("/hotfleet.v1.Coordinator/PlanPatch"), Need::Role(Role::Operator));
        assert_eq!(need("/hotfleet.v1.Coordinator/StartRollout"), Need::Role(Role::Operator));
        assert_eq!(need("/hotfleet.v1.Coordinator/Freeze"), Need::Role(Role::Operator));
        assert_eq!(need("/hotfleet.v1.Coordinator/RemoveNode"), Need::Role(Role::Admin), "unknown: admin");
        assert_eq!(need("/hotfleet.v1.Coordinator/WhoAmI"), Need::Credential);
        assert_eq!(need("/hotfleet.v1.AgentGateway/Register"), Need::Certificate);
        assert_eq!(need("/grpc.health.v1.Health/Check"), Need::Nothing);
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!(Role::parse(" operator"), Some(Role::Operator));
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn only_the_named_certificate_speaks_for_a_node() {
        let cert = |cn: &str| Caller {
            name: cn.into(),
            role: None,
            credential: Credential::Certificate(PeerCert { common_name: Some(cn.into()), ..PeerCert::default() }),
        };
        assert!(cert("node-1").speaks_for_node("node-1"));
        assert!(!cert("node-1").speaks_for_node("node-2"));
        let token = Caller { name: "node-1".into(), role: Some(Role::Admin), credential: Credential::Token };
        assert!(!token.speaks_for_node("node-1"), "a token never registers a node");
        assert!(Caller::insecure().speaks_for_node("anything"));
    }
}
