//! The coordinator's [`Gate`]: every request is matched to a caller (a
//! bearer token, else the client certificate, or everyone on an
//! `--insecure` coordinator), checked against what its method needs, and
//! handed on with the [`Caller`] in its extensions. A refusal names the
//! role needed.

use std::sync::Arc;

use hotfleet_proto::{gate::Gate, tls::PeerCert};
use tonic::{codegen::http, Status};

use super::{credentials::Credentials, need, Caller, Credential, Need};

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

    /// Who sent `request`: `Err` for a token nobody issued, `None` for nobody.
    fn caller<B>(&self, request: &http::Request<B>) -> Result<Option<Caller>, Status> {
        if self.insecure {
            return Ok(Some(Caller::insecure()));
        }
        if let Some(value) = request.headers().get(http::header::AUTHORIZATION) {
            let token = value.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).unwrap_or_default();
            return match self.credentials.token(token) {
                Some(caller) => Ok(Some(caller)),
                None => Err(Status::unauthenticated("unknown bearer token (revoked, or never issued)")),
            };
        }
        Ok(PeerCert::of(request).and_then(|cert| self.credentials.certificate(cert)))
    }
}

impl Gate for Authority {
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        let path = request.uri().path();
        let needed = need(path);
        let method = path.rsplit('/').next().unwrap_or(path).to_string();
        let caller = self.caller(request)?;
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
}
