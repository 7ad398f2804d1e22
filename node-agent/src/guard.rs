//! Only the coordinator may drive this agent: with TLS, every call of the
//! `Agent` service must come with a client certificate of the configured CA
//! naming the coordinator identity (`--coordinator-identity`). Anyone else
//! who reaches the port (another node, an operator's certificate, a stray
//! client) is refused before a handler runs. Health and reflection stay
//! open to whoever completed the handshake.

use hotfleet_proto::{gate::Gate, tls::PeerCert};
use tonic::{codegen::http, Status};

const AGENT: &str = "/hotfleet.v1.Agent/";

/// The agent server's gate.
#[derive(Debug, Clone)]
pub struct CoordinatorOnly {
    /// The coordinator's certificate identity; `None` with `--insecure`.
    identity: Option<String>,
}

impl CoordinatorOnly {
    pub fn new(identity: Option<String>) -> Self {
        Self { identity }
    }
}

impl Gate for CoordinatorOnly {
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        let Some(identity) = &self.identity else { return Ok(()) };
        if !request.uri().path().starts_with(AGENT) {
            return Ok(());
        }
        match PeerCert::of(request) {
            Some(cert) if cert.is(identity) => Ok(()),
            Some(cert) => Err(Status::permission_denied(format!(
                "{:?} is not the coordinator ({identity}): this agent takes commands only from its coordinator",
                cert.name().unwrap_or("an unnamed certificate")
            ))),
            None => {
                Err(Status::unauthenticated(format!("the agent takes commands only from {identity}'s certificate")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_certificate_commands_are_refused_but_health_is_open() {
        let gate = CoordinatorOnly::new(Some("hotfleet-coordinator".into()));
        let mut commit = http::Request::builder().uri("/hotfleet.v1.Agent/Commit").body(()).expect("request");
        assert_eq!(gate.admit(&mut commit).expect_err("no certificate").code(), tonic::Code::Unauthenticated);
        let mut health = http::Request::builder().uri("/grpc.health.v1.Health/Check").body(()).expect("request");
        assert!(gate.admit(&mut health).is_ok());
        let mut insecure = http::Request::builder().uri("/hotfleet.v1.Agent/Commit").body(()).expect("request");
        assert!(CoordinatorOnly::new(None).admit(&mut insecure).is_ok());
    }
}
