//! Transport security, one way for every hotfleet binary: the `--tls-*` /
//! `--insecure` flags, the PEM files they name (a cert-manager Secret's
//! `ca.crt`, `tls.crt`, `tls.key`), the tonic server and client settings
//! built from them, and reading who is on the other end of a connection
//! from its client certificate.
//!
//! Mutual TLS is the default and the only way to authenticate a peer; the
//! alternative is an explicit `--insecure` (plaintext, nobody
//! authenticated). Nothing in between: a server given neither refuses to
//! start, naming the flags it needs.

use std::{path::PathBuf, sync::Arc, time::Duration};

use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tonic::{
    codegen::http,
    transport::{
        server::{TcpConnectInfo, TlsConnectInfo},
        Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
    },
};

/// The identity the development CA gives the coordinator, and what agents
/// and the CLI expect of it unless told otherwise (`--coordinator-identity`).
pub const DEFAULT_COORDINATOR_IDENTITY: &str = "hotfleet-coordinator";

/// The organizational unit through which the development CA gives an
/// operator certificate its role: `hotfleet-role=operator`.
pub const ROLE_OU_PREFIX: &str = "hotfleet-role=";

/// Request metadata in which a `hotfleet-relay` hands the coordinator the
/// client certificate (DER, hex) of the agent it forwards a call for. A
/// coordinator believes it only from a relay it trusts (`--relay`).
pub const RELAYED_CERT_HEADER: &str = "x-hotfleet-relayed-cert";

/// The transport flags every binary takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// CA certificate (PEM) that issued every hotfleet certificate (a Secret's ca.crt).
    #[arg(long, global = true, env = "HOTFLEET_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM; a Secret's tls.crt).
    #[arg(long, global = true, env = "HOTFLEET_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM; a Secret's tls.key).
    #[arg(long, global = true, env = "HOTFLEET_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Local development only: plaintext, no authentication, every caller
    /// treated as admin.
    #[arg(long, global = true, env = "HOTFLEET_INSECURE")]
    pub insecure: bool,
}

/// Whether a process must present a certificate of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnCert {
    /// Servers (coordinator, agent): `--tls-cert` and `--tls-key` are required.
    Required,
    /// The CLI: a bearer token may stand in for a client certificate.
    Optional,
}

/// Whether a server demands a client certificate in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    /// Agents: only the coordinator may call, and it always has one.
    Required,
    /// Coordinators: operators may come with a bearer token instead.
    Optional,
}

/// Why the transport flags do not make a usable setting.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no transport security configured: give --tls-ca, --tls-cert and --tls-key (PEM files, e.g. from `hotfleet certs dev --out DIR`), or --insecure for local development (plaintext, no authentication)")]
    NotConfigured,
    #[error("missing {missing}: --tls-ca, --tls-cert and --tls-key go together")]
    Incomplete { missing: String },
    #[error("--insecure contradicts {given}: drop one")]
    Contradiction { given: String },
    #[error("--{flag} {}: {reason}", path.display())]
    File { flag: &'static str, path: PathBuf, reason: String },
}

/// The PEM material of a TLS setting, checked at start.
#[derive(Debug)]
pub struct Material {
    ca: Certificate,
    identity: Option<Identity>,
}

/// Plaintext, or mutual TLS with one CA.
#[derive(Debug, Clone)]
pub enum Transport {
    Insecure,
    Tls(Arc<Material>),
}

impl TlsArgs {
    /// Checks the flags and reads the files; every error names the flag.
    pub fn transport(&self, own: OwnCert) -> Result<Transport, TlsError> {
        let named = [("--tls-ca", &self.tls_ca), ("--tls-cert", &self.tls_cert), ("--tls-key", &self.tls_key)];
        let given: Vec<&str> = named.iter().filter(|(_, p)| p.is_some()).map(|(f, _)| *f).collect();
        if self.insecure {
            return match given.is_empty() {
                true => Ok(Transport::Insecure),
                false => Err(TlsError::Contradiction { given: given.join(", ") }),
            };
        }
        if given.is_empty() {
            return Err(TlsError::NotConfigured);
        }
        let mut missing: Vec<&str> = Vec::new();
        if self.tls_ca.is_none() {
            missing.push("--tls-ca");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() || (own == OwnCert::Required && self.tls_cert.is_none()) {
            missing.extend(named[1..].iter().filter(|(_, p)| p.is_none()).map(|(f, _)| *f));
        }
        if !missing.is_empty() {
            return Err(TlsError::Incomplete { missing: missing.join(" and ") });
        }
        let (Some(ca_path), cert, key) = (&self.tls_ca, &self.tls_cert, &self.tls_key) else {
            return Err(TlsError::NotConfigured);
        };
        let ca = read("tls-ca", ca_path)?;
        if CertificateDer::pem_slice_iter(&ca).next().is_none() {
            return Err(file_error("tls-ca", ca_path, "holds no PEM certificate"));
        }
        let identity = match (cert, key) {
            (Some(cert_path), Some(key_path)) => {
                let cert = read("tls-cert", cert_path)?;
                if CertificateDer::pem_slice_iter(&cert).next().is_none() {
                    return Err(file_error("tls-cert", cert_path, "holds no PEM certificate"));
                }
                let key = read("tls-key", key_path)?;
                if let Err(e) = PrivateKeyDer::from_pem_slice(&key) {
                    return Err(file_error("tls-key", key_path, &format!("no PEM private key ({e})")));
                }
                Some(Identity::from_pem(cert, key))
            }
            _ => None,
        };
        Ok(Transport::Tls(Arc::new(Material { ca: Certificate::from_pem(ca), identity })))
    }
}

fn read(flag: &'static str, path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_error(flag, path, &e.to_string()))
}

fn file_error(flag: &'static str, path: &std::path::Path, reason: &str) -> TlsError {
    TlsError::File { flag, path: path.to_path_buf(), reason: reason.to_string() }
}

impl Transport {
    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }

    /// The server side: `None` when insecure (plaintext). `handshake_timeout`
    /// is the listener's own deadline (`ConnLimits`), so one setting governs
    /// how long a connection may take to become a client.
    pub fn server_config(&self, clients: ClientCerts, handshake_timeout: Duration) -> Option<ServerTlsConfig> {
        let Transport::Tls(m) = self else { return None };
        let mut config = ServerTlsConfig::new()
            .client_ca_root(m.ca.clone())
            .client_auth_optional(clients == ClientCerts::Optional)
            .timeout(handshake_timeout);
        if let Some(identity) = &m.identity {
            config = config.identity(identity.clone());
        }
        Some(config)
    }

    /// An endpoint for `addr` (`host:port` or a URL). With TLS the scheme
    /// becomes `https` whatever was written, and the server must present a
    /// certificate of our CA naming `server_name` (the address itself is
    /// not what is verified: nodes and coordinators are named by identity).
    pub fn endpoint(&self, addr: &str, server_name: &str) -> Result<Endpoint, String> {
        let url = crate::address::endpoint_url(addr);
        let Transport::Tls(m) = self else {
            return Endpoint::from_shared(url).map_err(|e| e.to_string());
        };
        let url = match url.split_once("://") {
            Some((_, rest)) => format!("https://{rest}"),
            None => format!("https://{url}"),
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(m.ca.clone()).domain_name(server_name.to_string());
        if let Some(identity) = &m.identity {
            tls = tls.identity(identity.clone());
        }
        Endpoint::from_shared(url).and_then(|e| e.tls_config(tls)).map_err(|e| e.to_string())
    }
}

/// Who a verified client certificate names. The handshake has already
/// checked it against our CA; this only reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerCert {
    pub common_name: Option<String>,
    /// Organizational units of the subject (the dev CA writes roles here).
    pub org_units: Vec<String>,
    /// DNS names of the subject alternative name extension.
    pub dns_names: Vec<String>,
}

impl PeerCert {
    /// The client certificate of the connection `request` came on, if any.
    pub fn of<B>(request: &http::Request<B>) -> Option<PeerCert> {
        with_client_der(request, PeerCert::from_der).flatten()
    }

    /// The client certificate of the connection `request` came on, as DER
    /// (what a relay hands on).
    pub fn der_of<B>(request: &http::Request<B>) -> Option<Vec<u8>> {
        with_client_der(request, <[u8]>::to_vec)
    }

    /// Reads a DER certificate; `None` when it does not parse.
    pub fn from_der(der: &[u8]) -> Option<PeerCert> {
        let der = CertificateDer::from(der);
        let cert = webpki::EndEntityCert::try_from(&der).ok()?;
        let mut peer =
            PeerCert { dns_names: cert.valid_dns_names().map(str::to_string).collect(), ..PeerCert::default() };
        for (oid, value) in der_name::attributes(cert.subject()) {
            match oid {
                der_name::COMMON_NAME => peer.common_name = Some(value),
                der_name::ORG_UNIT => peer.org_units.push(value),
                _ => {}
            }
        }
        Some(peer)
    }

    /// The name this certificate is known by: its CN, else its first DNS name.
    pub fn name(&self) -> Option<&str> {
        self.common_name.as_deref().or_else(|| self.dns_names.first().map(String::as_str))
    }

    /// Whether the certificate names `identity` (as CN or a DNS name).
    pub fn is(&self, identity: &str) -> bool {
        self.common_name.as_deref() == Some(identity) || self.dns_names.iter().any(|n| n == identity)
    }
}

/// `read` applied to the DER of the client certificate of the connection
/// `request` came on, borrowed: every request of a TLS server reads it, so
/// it is not copied unless the caller keeps it.
fn with_client_der<B, T>(request: &http::Request<B>, read: impl FnOnce(&[u8]) -> T) -> Option<T> {
    let info = request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    Some(read(certs.first()?.as_ref()))
}

/// Just enough DER to read the attributes of an X.501 Name (webpki hands
/// the subject over raw): a SEQUENCE OF SET OF SEQUENCE { OID, string }.
mod der_name {
    /// 2.5.4.3, content octets.
    pub const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    /// 2.5.4.11, content octets.
    pub const ORG_UNIT: &[u8] = &[0x55, 0x04, 0x0b];

    /// One tag-length-value: (tag, value, rest). `None` on anything malformed.
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
    }

    /// Every (OID, text) of the name's contents, in order; values that are
    /// not a text string are skipped.
    pub fn attributes(mut name: &[u8]) -> Vec<(&[u8], String)> {
        let mut out = Vec::new();
        while let Some((0x31, mut set, rest)) = tlv(name) {
            name = rest;
            while let Some((0x30, atv, more)) = tlv(set) {
                set = more;
                let Some((0x06, oid, value)) = tlv(atv) else { continue };
                // UTF8String, PrintableString, IA5String, T61String.
                if let Some((0x0c | 0x13 | 0x16 | 0x14, text, _)) = tlv(value) {
                    out.push((oid, String::from_utf8_lossy(text).into_owned()));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(ca: bool, cert: bool, key: bool, insecure: bool) -> TlsArgs {
        let path = |on: bool, name: &str| on.then(|| PathBuf::from(format!("/nonexistent/{name}")));
        TlsArgs { tls_ca: path(ca, "ca.crt"), tls_cert: path(cert, "tls.crt"), tls_key: path(key, "tls.key"), insecure }
    }

    #[test]
    fn flags_say_exactly_what_is_missing() {
        let err = |a: TlsArgs, own| a.transport(own).expect_err("invalid").to_string();
        assert!(err(args(false, false, false, false), OwnCert::Required).contains("--insecure"));
        assert!(err(args(true, false, false, false), OwnCert::Required).contains("missing --tls-cert and --tls-key"));
        assert!(err(args(false, true, true, false), OwnCert::Required).contains("missing --tls-ca"));
        assert!(err(args(true, true, false, false), OwnCert::Optional).contains("missing --tls-key"));
        assert!(err(args(true, false, false, true), OwnCert::Required).contains("contradicts --tls-ca"));
        assert!(err(args(true, false, false, false), OwnCert::Optional).contains("--tls-ca /nonexistent/ca.crt"));
        assert!(args(false, false, false, true).transport(OwnCert::Required).is_ok_and(|t| !t.is_tls()));
    }

    #[test]
    fn insecure_endpoints_stay_plain() {
        let e = Transport::Insecure.endpoint("127.0.0.1:7700", "x").expect("endpoint");
        assert_eq!(e.uri().scheme_str(), Some("http"));
    }

    #[test]
    fn name_attributes_are_read_from_der() {
        // SET { SEQ { OID 2.5.4.3, UTF8 "node-1" } }, SET { SEQ { OID 2.5.4.11, PRINTABLE "ops" } }
        let name = [
            0x31, 0x0f, 0x30, 0x0d, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x06, b'n', b'o', b'd', b'e', b'-', b'1', 0x31,
            0x0c, 0x30, 0x0a, 0x06, 0x03, 0x55, 0x04, 0x0b, 0x13, 0x03, b'o', b'p', b's',
        ];
        let attrs = der_name::attributes(&name);
        assert_eq!(attrs, vec![(der_name::COMMON_NAME, "node-1".to_string()), (der_name::ORG_UNIT, "ops".into())]);
        assert!(der_name::attributes(&name[..5]).is_empty(), "truncated input reads as nothing");
    }
}
