//! The coordinator's [`Gate`]: every request is matched to a caller (a
//! bearer token, else the client certificate, or everyone on an
//! `--insecure` coordinator), checked against what its method needs, and
//! handed on with the [`Caller`] in its extensions. A refusal names the
//! role needed.

use std::sync::Arc;

use hotfleet_proto::{
    attach::ATTACH_RELAYED_PATH,
    gate::Gate,
    tls::{PeerCert, RELAYED_CERT_HEADER},
};
use tonic::{codegen::http, Status};

use super::{credentials::Credentials, need, Caller, Credential, Need, GATEWAY};

/// How to present a credential, for refusals.
const HOW: &str = "present a client certificate of the hotfleet CA (--tls-cert, --tls-key) or a bearer token (--token)";

/// Decides every request of a coordinator.
#[derive(Debug, Clone)]
pub struct Authority {
    insecure: bool,
    credentials: Arc<Credentials>,
}

impl Authority {
    pub fn new(insecure: bool, credentials: Credentials) -> Self {
        Self { insecure, credentials: Arc::new(credentials) }
    }

    /// Who sent a request for `path` with `headers`, on a connection whose
    /// client certificate is `peer`: `Err` for a token nobody issued or a
    /// relayed identity not to be believed, `None` for nobody.
    fn caller(&self, path: &str, headers: &http::HeaderMap, peer: Option<PeerCert>) -> Result<Option<Caller>, Status> {
        if self.insecure {
            return Ok(Some(Caller::insecure()));
        }
        if let Some(relayed) = headers.get(RELAYED_CERT_HEADER) {
            return self.relayed(path, relayed, peer).map(Some);
        }
        if let Some(value) = headers.get(http::header::AUTHORIZATION) {
            let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
            return match self.credentials.token(token) {
                Some(caller) => Ok(Some(caller)),
                None => Err(Status::unauthenticated("unknown bearer token (revoked, or never issued)")),
            };
        }
        Ok(peer.and_then(|cert| self.credentials.certificate(cert)))
    }

    /// The agent a relay forwards a call for: believed only from a relay this
    /// coordinator trusts (`--relay`), only for the agents' own service, and
    /// never with a role (an operator certificate behind a relay is an agent).
    fn relayed(&self, path: &str, value: &http::HeaderValue, peer: Option<PeerCert>) -> Result<Caller, Status> {
        let named = peer.as_ref().and_then(PeerCert::name);
        let Some(relay) = named.filter(|name| self.credentials.is_relay(name)) else {
            return Err(Status::permission_denied(format!(
                "{} is not a trusted relay (coordinator --relay): it may not speak for another certificate",
                named.unwrap_or("an anonymous caller")
            )));
        };
        if !path.starts_with(GATEWAY) {
            return Err(Status::permission_denied(format!("relay {relay} may forward agents' calls only, not {path}")));
        }
        let der = hex::decode(value.as_bytes())
            .map_err(|_| Status::invalid_argument(format!("relay {relay} sent a malformed {RELAYED_CERT_HEADER}")))?;
        relayed_caller(relay, &der)
    }

    /// A relay's stream of many agents (`AttachRelayed`) only from a relay
    /// this coordinator trusts: each agent on it is then believed from the
    /// certificate the relay names with its hello ([`relayed_caller`]).
    fn check_relay_stream(&self, path: &str, headers: &http::HeaderMap, peer: Option<&PeerCert>) -> Result<(), Status> {
        if self.insecure || path != ATTACH_RELAYED_PATH {
            return Ok(());
        }
        if headers.contains_key(RELAYED_CERT_HEADER) {
            // An agent's call a relay forwards: the agent may not attach others.
            return Err(Status::permission_denied("an agent behind a relay may not attach other agents"));
        }
        let named = peer.and_then(PeerCert::name);
        match named.filter(|name| self.credentials.is_relay(name)) {
            Some(_) => Ok(()),
            None => Err(Status::permission_denied(format!(
                "{} is not a trusted relay (coordinator --relay): only a relay attaches other agents",
                named.unwrap_or("an anonymous caller")
            ))),
        }
    }
}

/// The agent a trusted relay speaks for, from the certificate (DER) the
/// agent presented to it; never with a role (an operator certificate
/// behind a relay is an agent).
pub fn relayed_caller(relay: &str, der: &[u8]) -> Result<Caller, Status> {
    let cert = PeerCert::from_der(der)
        .filter(|cert| cert.name().is_some())
        .ok_or_else(|| Status::invalid_argument(format!("relay {relay} sent a malformed agent certificate")))?;
    let name = cert.name().unwrap_or_default().to_string();
    Ok(Caller { name, role: None, credential: Credential::Certificate(cert) })
}

impl Gate for Authority {
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        let path = request.uri().path();
        let needed = need(path);
        let method = path.rsplit('/').next().unwrap_or(path).to_string();
        let peer = PeerCert::of(request);
        self.check_relay_stream(path, request.headers(), peer.as_ref())?;
        let caller = self.caller(path, request.headers(), peer)?;
        check(needed, caller.as_ref(), &method)?;
        if let Some(caller) = caller {
            request.extensions_mut().insert(caller);
        }
        Ok(())
    }
}

/// Whether `caller` may call `method`, which needs `needed`.
pub fn check(needed: Need, caller: Option<&Caller>, method: &str) -> Result<(), Status> {
    match (needed, caller) {
        (Need::Nothing, _) => Ok(()),
        (Need::Credential, Some(_)) => Ok(()),
        (Need::Credential, None) => Err(Status::unauthenticated(format!("no credential: {HOW}"))),
        (Need::Certificate, Some(c)) if matches!(c.credential, Credential::Certificate(_) | Credential::Insecure) => {
            Ok(())
        }
        (Need::Certificate, _) => Err(Status::unauthenticated(format!(
            "{method} needs the node's client certificate (--tls-cert, --tls-key)"
        ))),
        (Need::Role(role), None) => Err(Status::unauthenticated(format!("{method} needs role {role}: {HOW}"))),
        (Need::Role(role), Some(c)) if c.role.is_some_and(|r| r >= role) => Ok(()),
        (Need::Role(role), Some(c)) => Err(Status::permission_denied(format!(
            "{} (role {}) may not call {method}: it needs role {role}",
            c.name,
            c.role.map(|r| r.name()).unwrap_or("none")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::auth::Role;

    fn with(role: Option<Role>) -> Caller {
        Caller { name: "bob".into(), role, credential: Credential::Token }
    }

    #[test]
    fn refusals_name_the_role_needed() {
        let op = Need::Role(Role::Operator);
        let anonymous = check(op, None, "StartRollout").expect_err("anonymous");
        assert_eq!(anonymous.code(), Code::Unauthenticated);
        assert!(anonymous.message().contains("needs role operator"), "{}", anonymous.message());
        let viewer = check(op, Some(&with(Some(Role::Viewer))), "StartRollout").expect_err("viewer");
        assert_eq!(viewer.code(), Code::PermissionDenied);
        assert!(viewer.message().contains("bob (role viewer)") && viewer.message().contains("needs role operator"));
        assert!(check(op, Some(&with(Some(Role::Admin))), "StartRollout").is_ok(), "admin covers operator");
        assert!(check(Need::Role(Role::Viewer), Some(&with(None)), "ListNodes").is_err(), "no role, no reads");
        assert!(check(Need::Credential, Some(&with(None)), "WhoAmI").is_ok());
        assert!(check(Need::Certificate, Some(&with(Some(Role::Admin))), "Register").is_err(), "tokens never register");
        assert!(check(Need::Nothing, None, "Check").is_ok());
    }

    #[test]
    fn the_gate_attaches_the_caller_and_refuses_unknown_tokens() {
        let insecure = Authority::new(true, Credentials::default());
        let mut request = http::Request::builder().uri("/hotfleet.v1.Coordinator/Freeze").body(()).expect("request");
        insecure.admit(&mut request).expect("insecure admits everything");
        assert_eq!(request.extensions().get::<Caller>(), Some(&Caller::insecure()));

        let secure = Authority::new(false, Credentials::default());
        let mut request = http::Request::builder()
            .uri("/hotfleet.v1.Coordinator/ListNodes")
            .header("authorization", "Bearer nope")
            .header("x-hotfleet-actor", "alice-the-sre")
            .body(())
            .expect("request");
        assert_eq!(secure.admit(&mut request).expect_err("unknown token").code(), Code::Unauthenticated);
        let mut bare = http::Request::builder().uri("/hotfleet.v1.Coordinator/Freeze").body(()).expect("request");
        assert_eq!(secure.admit(&mut bare).expect_err("anonymous").code(), Code::Unauthenticated);
    }

    /// A certificate's DER as a relay sends it, and the fields the gate reads.
    fn relayed_cert(cn: &str, ou: Option<&str>) -> (String, PeerCert) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(vec![cn.to_string()]).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        if let Some(ou) = ou {
            params.distinguished_name.push(rcgen::DnType::OrganizationalUnitName, ou);
        }
        let der = params.self_signed(&key).expect("cert").der().to_vec();
        (hex::encode(&der), PeerCert::from_der(&der).expect("parses"))
    }

    fn peer(cn: &str) -> Option<PeerCert> {
        Some(PeerCert { common_name: Some(cn.into()), ..PeerCert::default() })
    }

    #[test]
    fn a_relayed_agent_is_believed_only_from_a_trusted_relay_and_only_for_the_agent_service() {
        let authority = Authority::new(false, Credentials::default().with_relays(&["relay-1".into()]));
        let register = "/hotfleet.v1.AgentGateway/Register";
        let (hex_der, _) = relayed_cert("node-7", None);
        let mut headers = http::HeaderMap::new();
        headers.insert(RELAYED_CERT_HEADER, hex_der.parse().expect("ascii"));

        let caller = authority.caller(register, &headers, peer("relay-1")).expect("trusted").expect("someone");
        assert_eq!((caller.name.as_str(), caller.role), ("node-7", None));
        assert!(caller.speaks_for_node("node-7") && !caller.speaks_for_node("relay-1"));

        // An agent (or anyone not named by --relay) claiming to relay is refused.
        let forged = authority.caller(register, &headers, peer("node-1")).expect_err("untrusted");
        assert_eq!(forged.code(), Code::PermissionDenied);
        assert!(forged.message().contains("node-1 is not a trusted relay"), "{}", forged.message());
        assert!(authority.caller(register, &headers, None).is_err(), "no certificate, no relay");
        // A trusted relay forwards agents' calls only.
        let operator = authority.caller("/hotfleet.v1.Coordinator/Freeze", &headers, peer("relay-1"));
        assert_eq!(operator.expect_err("not the agent service").code(), Code::PermissionDenied);
        // Garbage in the header changes nothing.
        headers.insert(RELAYED_CERT_HEADER, "zz-not-hex".parse().expect("ascii"));
        let garbage = authority.caller(register, &headers, peer("relay-1")).expect_err("garbage");
        assert_eq!(garbage.code(), Code::InvalidArgument);
    }

    #[test]
    fn an_operator_certificate_behind_a_relay_has_no_role() {
        let authority = Authority::new(false, Credentials::default().with_relays(&["relay-1".into()]));
        let (hex_der, cert) = relayed_cert("alice", Some("hotfleet-role=admin"));
        assert_eq!(Credentials::default().certificate(cert).expect("named").role, Some(Role::Admin), "direct: admin");
        let mut headers = http::HeaderMap::new();
        headers.insert(RELAYED_CERT_HEADER, hex_der.parse().expect("ascii"));
        let caller =
            authority.caller("/hotfleet.v1.AgentGateway/Heartbeat", &headers, peer("relay-1")).expect("ok").expect("x");
        assert_eq!(caller.role, None);
        assert!(check(Need::Role(Role::Viewer), Some(&caller), "ListNodes").is_err());
    }
}
