//! Where callers' names and roles come from: client certificates (role from
//! `--operators FILE`, or else the `hotfleet-role=` OU the development CA
//! writes) and bearer tokens (`--tokens FILE`, stored as SHA-256 hashes,
//! never in clear).
//!
//! With `--operators`, that file is the only source of certificate roles:
//! an OU written by whatever CA is configured is then ignored, so a CA
//! shared with other systems cannot hand out hotfleet roles by accident.

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use hotfleet_proto::tls::{PeerCert, ROLE_OU_PREFIX};
use sha2::{Digest, Sha256};

use super::{Caller, Credential, Role};

/// A line of `--operators` or `--tokens` that does not parse.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("--{flag} {}: {reason}", path.display())]
    File { flag: &'static str, path: PathBuf, reason: String },
}

/// The hex SHA-256 of a bearer token: what a tokens file holds.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// Operators' roles and the known tokens, loaded at start.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Certificate name → role; `None` without `--operators`.
    operators: Option<HashMap<String, Role>>,
    /// Token hash → (name, role).
    tokens: HashMap<String, (String, Role)>,
    /// Certificate names of the relays trusted to speak for agents (`--relay`).
    relays: HashSet<String>,
}

impl Credentials {
    /// `operators`: lines `NAME ROLE`; `tokens`: lines `SHA256HEX NAME ROLE`.
    /// Blank lines and `#` comments are skipped in both.
    pub fn load(operators: Option<&Path>, tokens: Option<&Path>) -> Result<Self, CredentialsError> {
        let mut credentials = Credentials::default();
        if let Some(path) = operators {
            let mut map = HashMap::new();
            for fields in lines("operators", path, 2)? {
                map.insert(fields[0].clone(), role("operators", path, &fields[1])?);
            }
            credentials.operators = Some(map);
        }
        if let Some(path) = tokens {
            for fields in lines("tokens", path, 3)? {
                let hash = fields[0].to_ascii_lowercase();
                if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(bad("tokens", path, format!("{:?} is not a hex SHA-256", fields[0])));
                }
                credentials.tokens.insert(hash, (fields[1].clone(), role("tokens", path, &fields[2])?));
            }
        }
        Ok(credentials)
    }

    /// Trusts the relays named `names` (certificate names) to forward agents' calls.
    pub fn with_relays(mut self, names: &[String]) -> Self {
        self.relays.extend(names.iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()));
        self
    }

    /// Whether a certificate named `name` is a trusted relay.
    pub fn is_relay(&self, name: &str) -> bool {
        self.relays.contains(name)
    }

    /// The caller a bearer token stands for, if the token is known.
    pub fn token(&self, token: &str) -> Option<Caller> {
        let (name, role) = self.tokens.get(&token_hash(token))?;
        Some(Caller { name: name.clone(), role: Some(*role), credential: Credential::Token })
    }

    /// The caller a verified client certificate stands for (`None`: it
    /// names nobody).
    pub fn certificate(&self, cert: PeerCert) -> Option<Caller> {
        let name = cert.name()?.to_string();
        let role = match &self.operators {
            Some(map) => map.get(&name).copied(),
            None => cert.org_units.iter().filter_map(|ou| ou.strip_prefix(ROLE_OU_PREFIX)).find_map(Role::parse),
        };
        Some(Caller { name, role, credential: Credential::Certificate(cert) })
    }
}

fn bad(flag: &'static str, path: &Path, reason: String) -> CredentialsError {
    CredentialsError::File { flag, path: path.to_path_buf(), reason }
}

fn role(flag: &'static str, path: &Path, text: &str) -> Result<Role, CredentialsError> {
    Role::parse(text).ok_or_else(|| bad(flag, path, format!("unknown role {text:?} (viewer, operator or admin)")))
}

/// The whitespace-separated fields of each meaningful line, `n` per line.
fn lines(flag: &'static str, path: &Path, n: usize) -> Result<Vec<Vec<String>>, CredentialsError> {
    let text = std::fs::read_to_string(path).map_err(|e| bad(flag, path, e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        if fields.len() != n {
            return Err(bad(flag, path, format!("line {}: expected {n} fields, got {}", i + 1, fields.len())));
        }
        out.push(fields);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, ou: &[&str]) -> PeerCert {
        PeerCert {
            common_name: Some(cn.into()),
            org_units: ou.iter().map(|s| s.to_string()).collect(),
            dns_names: vec![cn.into()],
        }
    }

    #[test]
    fn certificate_roles_come_from_the_ou_or_only_the_operators_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let none = Credentials::default();
        let alice = none.certificate(cert("alice", &["hotfleet-role=operator"])).expect("named");
        assert_eq!((alice.name.as_str(), alice.role), ("alice", Some(Role::Operator)));
        assert_eq!(none.certificate(cert("node-1", &[])).expect("named").role, None);
        assert_eq!(none.certificate(cert("x", &["Engineering"])).expect("named").role, None);

        let file = dir.path().join("operators");
        std::fs::write(&file, "# name role\nbob viewer\n\n").expect("write");
        let mapped = Credentials::load(Some(&file), None).expect("load");
        assert_eq!(mapped.certificate(cert("bob", &[])).expect("named").role, Some(Role::Viewer));
        let ignored = mapped.certificate(cert("alice", &["hotfleet-role=admin"])).expect("named");
        assert_eq!(ignored.role, None, "with --operators the OU grants nothing");
    }

    #[test]
    fn tokens_are_matched_by_hash_and_bad_lines_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("tokens");
        std::fs::write(&file, format!("{} ci-bot operator # the pipeline\n", token_hash("s3cret"))).expect("write");
        let creds = Credentials::load(None, Some(&file)).expect("load");
        let caller = creds.token("s3cret").expect("known");
        assert_eq!((caller.name.as_str(), caller.role), ("ci-bot", Some(Role::Operator)));
        assert!(creds.token("guess").is_none());

        std::fs::write(&file, "abc ci-bot operator\n").expect("write");
        let err = Credentials::load(None, Some(&file)).expect_err("bad hash").to_string();
        assert!(err.contains("--tokens") && err.contains("SHA-256"), "{err}");
        std::fs::write(&file, format!("{} ci-bot root\n", token_hash("x"))).expect("write");
        assert!(Credentials::load(None, Some(&file)).expect_err("bad role").to_string().contains("root"));
    }
}
