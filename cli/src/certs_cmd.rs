//! `hotfleet certs dev`: a development CA and the certificates a local or
//! test fleet needs, in the layout a cert-manager Secret mounts (`ca.crt`,
//! `tls.crt`, `tls.key` per identity), so the `--tls-*` flags take them:
//!
//! ```text
//! DIR/ca.crt, DIR/ca.key           the CA (keep ca.key away from every host)
//! DIR/coordinator/{ca.crt,tls.crt,tls.key}   CN/DNS hotfleet-coordinator, localhost, 127.0.0.1
//! DIR/nodes/<node-id>/...          CN/DNS the node id
//! DIR/operators/<name>/...         CN the name, OU hotfleet-role=<role>
//! DIR/relays/<name>/...            CN/DNS the name, localhost, 127.0.0.1 (a hotfleet-relay)
//! ```
//!
//! Run again on the same DIR, it issues more certificates from the same CA
//! (and leaves an existing coordinator certificate alone). Private keys are
//! written 0600. For development and tests: a production CA (cert-manager,
//! Vault) issues the same names instead.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context};
use hotfleet_proto::tls::{DEFAULT_COORDINATOR_IDENTITY, ROLE_OU_PREFIX};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::exit::CliResult;

const ROLES: [&str; 3] = ["viewer", "operator", "admin"];
const CA_NAME: &str = "hotfleet development CA";

/// `hotfleet certs dev` flags.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Directory for the CA and certificates (created; an existing CA in it is reused).
    #[arg(long)]
    pub out: PathBuf,
    /// A node id to issue an agent certificate for. Repeatable.
    #[arg(long = "node")]
    pub nodes: Vec<String>,
    /// NAME:ROLE of an operator certificate (role viewer, operator or admin). Repeatable.
    #[arg(long = "operator", value_parser = parse_operator)]
    pub operators: Vec<(String, String)>,
    /// The name of a `hotfleet-relay` certificate (the coordinator trusts it
    /// with `--relay NAME`; agents behind it verify `--relay-identity NAME`). Repeatable.
    #[arg(long = "relay")]
    pub relays: Vec<String>,
    /// The coordinator's identity (CN and DNS name of its certificate).
    #[arg(long, default_value = DEFAULT_COORDINATOR_IDENTITY)]
    pub coordinator_identity: String,
    /// More DNS names or IP addresses for the coordinator's certificate. Repeatable.
    #[arg(long = "coordinator-san")]
    pub coordinator_sans: Vec<String>,
}

fn parse_operator(text: &str) -> Result<(String, String), String> {
    let (name, role) =
        text.split_once(':').ok_or_else(|| format!("{text:?} must be NAME:ROLE, e.g. alice:operator"))?;
    check_name(name)?;
    if !ROLES.contains(&role) {
        return Err(format!("{text:?}: role {role:?} is not one of viewer, operator, admin"));
    }
    Ok((name.to_string(), role.to_string()))
}

/// Names become directory names and certificate names: keep them plain.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    ok.then_some(()).ok_or_else(|| format!("{name:?}: use 1-64 letters, digits, - _ . (not starting with .)"))
}

pub fn dev(args: DevArgs) -> CliResult {
    issue_all(&args).map_err(Into::into)
}

fn issue_all(args: &DevArgs) -> anyhow::Result<()> {
    let identity = &args.coordinator_identity;
    for node in &args.nodes {
        check_name(node).map_err(|e| anyhow!("--node {e}"))?;
    }
    // One name, one kind: a node or operator named like the coordinator
    // could command agents; an operator named like a node could register as it.
    for (name, _) in &args.operators {
        if name == identity || args.nodes.contains(name) {
            bail!("--operator {name}: the name is taken by the coordinator or a node");
        }
    }
    // A relay named like a node could register as it; like an operator, hold its role.
    for name in &args.relays {
        check_name(name).map_err(|e| anyhow!("--relay {e}"))?;
        if name == identity || args.nodes.contains(name) || args.operators.iter().any(|(o, _)| o == name) {
            bail!("--relay {name}: the name is taken by the coordinator, a node or an operator");
        }
    }
    if args.nodes.contains(identity) {
        bail!("--node {identity}: that is the coordinator's identity");
    }
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let ca = Ca::open_or_create(&args.out)?;
    let coordinator_dir = args.out.join("coordinator");
    if !coordinator_dir.join("tls.crt").is_file() {
        let mut sans = vec![identity.clone(), "localhost".into(), "127.0.0.1".into(), "::1".into()];
        sans.extend(args.coordinator_sans.iter().cloned());
        ca.issue(&coordinator_dir, identity, None, sans)?;
        println!("coordinator   {}", coordinator_dir.display());
    }
    for node in &args.nodes {
        let dir = args.out.join("nodes").join(node);
        ca.issue(&dir, node, None, vec![node.clone()])?;
        println!("node          {}", dir.display());
    }
    for name in &args.relays {
        let dir = args.out.join("relays").join(name);
        let sans = vec![name.clone(), "localhost".into(), "127.0.0.1".into(), "::1".into()];
        ca.issue(&dir, name, None, sans)?;
        println!("relay         {}", dir.display());
    }
    for (name, role) in &args.operators {
        let dir = args.out.join("operators").join(name);
        ca.issue(&dir, name, Some(role), Vec::new())?;
        println!("operator      {}  ({role})", dir.display());
    }
    println!(
        "CA            {}  (ca.key signs certificates: keep it off every host)",
        args.out.join("ca.crt").display()
    );
    Ok(())
}

/// The development CA: its key and the parameters its certificate was made
/// from (rebuilt identically when reused, which is all signing needs).
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

impl Ca {
    fn open_or_create(dir: &Path) -> anyhow::Result<Ca> {
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        if cert_path.is_file() && key_path.is_file() {
            let key_pem = fs::read_to_string(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
            let key =
                KeyPair::from_pem(&key_pem).with_context(|| format!("{} is not a PEM key", key_path.display()))?;
            let pem = fs::read_to_string(&cert_path).with_context(|| format!("reading {}", cert_path.display()))?;
            return Ok(Ca { issuer: Issuer::new(ca_params()?, key), pem });
        }
        let key = KeyPair::generate()?;
        let mut params = ca_params()?;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        write_file(&cert_path, cert.pem().as_bytes(), false)?;
        write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
        Ok(Ca { issuer: Issuer::new(params, key), pem: cert.pem() })
    }

    /// Issues `name`'s certificate into `dir` (ca.crt, tls.crt, tls.key).
    fn issue(&self, dir: &Path, name: &str, role: Option<&str>, sans: Vec<String>) -> anyhow::Result<()> {
        let mut params = CertificateParams::new(sans)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        if let Some(role) = role {
            dn.push(DnType::OrganizationalUnitName, format!("{ROLE_OU_PREFIX}{role}"));
        }
        params.distinguished_name = dn;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        // Coordinators and agents are both servers and clients; operators only clients.
        params.extended_key_usages = match role {
            Some(_) => vec![ExtendedKeyUsagePurpose::ClientAuth],
            None => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        };
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_file(&dir.join("ca.crt"), self.pem.as_bytes(), false)?;
        write_file(&dir.join("tls.crt"), cert.pem().as_bytes(), false)?;
        write_file(&dir.join("tls.key"), key.serialize_pem().as_bytes(), true)
    }
}

/// Writes `bytes` to `path`; a secret is created with mode 0600 from the
/// start (never world-readable, not even for a moment).
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> anyhow::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    if secret {
        // An existing file keeps its old mode through open(): set it.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use hotfleet_proto::tls::PeerCert;

    use super::*;

    fn pem_der(path: &Path) -> Vec<u8> {
        use rustls_pki_types::{pem::PemObject, CertificateDer};
        CertificateDer::from_pem_file(path).expect("pem").to_vec()
    }

    #[test]
    fn issues_named_certificates_from_one_reusable_ca() {
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("certs");
        let args = |nodes: &[&str], ops: &[(&str, &str)]| DevArgs {
            out: out.clone(),
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            operators: ops.iter().map(|(n, r)| (n.to_string(), r.to_string())).collect(),
            relays: Vec::new(),
            coordinator_identity: DEFAULT_COORDINATOR_IDENTITY.into(),
            coordinator_sans: Vec::new(),
        };
        dev(args(&["node-1"], &[("alice", "operator")])).expect("first run");
        let ca_before = fs::read(out.join("ca.crt")).expect("ca");
        dev(args(&["node-2"], &[])).expect("second run reuses the CA");
        assert_eq!(fs::read(out.join("ca.crt")).expect("ca"), ca_before);

        let node = PeerCert::from_der(&pem_der(&out.join("nodes/node-2/tls.crt"))).expect("parse");
        assert!(node.is("node-2") && !node.is("node-1"));
        let alice = PeerCert::from_der(&pem_der(&out.join("operators/alice/tls.crt"))).expect("parse");
        assert_eq!(alice.common_name.as_deref(), Some("alice"));
        assert_eq!(alice.org_units, vec!["hotfleet-role=operator".to_string()]);
        let coordinator = PeerCert::from_der(&pem_der(&out.join("coordinator/tls.crt"))).expect("parse");
        assert!(coordinator.is(DEFAULT_COORDINATOR_IDENTITY) && coordinator.dns_names.contains(&"localhost".into()));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &str| fs::metadata(out.join(p)).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode("ca.key"), 0o600);
            assert_eq!(mode("nodes/node-1/tls.key"), 0o600);
        }
        assert!(dev(args(&[DEFAULT_COORDINATOR_IDENTITY], &[])).is_err(), "a node may not take the coordinator's name");
        assert!(parse_operator("bob:root").is_err() && parse_operator("../x:viewer").is_err());
    }

    #[test]
    fn issues_relay_certificates_under_names_of_their_own() {
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("certs");
        let args = |relays: &[&str], nodes: &[&str]| DevArgs {
            out: out.clone(),
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            operators: Vec::new(),
            relays: relays.iter().map(|s| s.to_string()).collect(),
            coordinator_identity: DEFAULT_COORDINATOR_IDENTITY.into(),
            coordinator_sans: Vec::new(),
        };
        dev(args(&["rack-1"], &[])).expect("issue");
        let relay = PeerCert::from_der(&pem_der(&out.join("relays/rack-1/tls.crt"))).expect("parse");
        assert!(relay.is("rack-1") && relay.dns_names.contains(&"localhost".into()) && relay.org_units.is_empty());
        let taken = issue_all(&args(&["node-1"], &["node-1"])).expect_err("a relay may not take a node's name");
        assert!(taken.to_string().contains("--relay node-1"), "{taken}");
        assert!(issue_all(&args(&["../up"], &[])).is_err());
    }
}
