//! Flags and environment → a validated [`Config`]. Parsing fails fast with a
//! message naming the flag; nothing else in the coordinator reads flags.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};
use hotfleet_proto::tls::{OwnCert, TlsArgs, TlsError, Transport};

use crate::{
    grpc::limits::ServeLimits,
    store::{etcd::EtcdOptions, AuditRetention},
};

/// State store backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// One redb file in --data-dir (single coordinator).
    Embedded,
    /// An etcd cluster (--etcd-endpoints): several coordinators, one elected leader.
    Etcd,
}

/// `hotfleet-coordinator`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "hotfleet-coordinator",
    version,
    about = "hotfleet coordinator: stages signed patches and rolls them out across the fleet"
)]
pub struct Args {
    /// Address to serve gRPC on (agents and operators).
    #[arg(long, env = "HOTFLEET_LISTEN", default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// Directory of the embedded state store (created if missing).
    #[arg(long, env = "HOTFLEET_DATA_DIR", default_value = "./hotfleet-data")]
    pub data_dir: PathBuf,
    /// Public key file, or directory of *.pub files, whose signatures are accepted. Repeatable.
    #[arg(long = "trusted-key", env = "HOTFLEET_TRUSTED_KEYS", value_delimiter = ',')]
    pub trusted_keys: Vec<PathBuf>,
    /// Interval agents are told to heartbeat at, in whole seconds (rounded up).
    #[arg(long, env = "HOTFLEET_HEARTBEAT_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// Heartbeat intervals of silence after which a node is marked lost.
    #[arg(long, env = "HOTFLEET_LOST_AFTER", default_value_t = 3)]
    pub lost_after: u32,
    /// State store backend.
    #[arg(long, env = "HOTFLEET_STORE", value_enum, default_value = "embedded")]
    pub store: StoreKind,
    /// etcd members, comma-separated (http://host:2379 or https://host:2379).
    #[arg(long, env = "HOTFLEET_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    /// Every hotfleet key lives under this etcd key prefix.
    #[arg(long, env = "HOTFLEET_ETCD_PREFIX", default_value = "/hotfleet/")]
    pub etcd_prefix: String,
    /// etcd user (with --etcd-password).
    #[arg(long, env = "HOTFLEET_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// etcd password (prefer the environment variable over the flag).
    #[arg(long, env = "HOTFLEET_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// CA certificate (PEM) to verify etcd with.
    #[arg(long, env = "HOTFLEET_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's mutual TLS (with --etcd-key).
    #[arg(long, env = "HOTFLEET_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd's mutual TLS.
    #[arg(long, env = "HOTFLEET_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// Deadline of one etcd request.
    #[arg(long, env = "HOTFLEET_ETCD_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub etcd_timeout: Duration,
    /// Leader lease (etcd): a dead leader is replaced within about this long; whole seconds, at least 2s.
    #[arg(long, env = "HOTFLEET_LEADER_LEASE", default_value = "10s", value_parser = parse_duration)]
    pub leader_lease: Duration,
    /// Address followers name as the leader's, and agents and the CLI then call:
    /// host:port or a URL (default: http://<--listen>).
    #[arg(long, env = "HOTFLEET_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,
    /// Largest patch bundle accepted, in bytes.
    #[arg(long, env = "HOTFLEET_MAX_PATCH_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_patch_bytes: usize,
    /// Deadline of one call to an agent (a step's deadline caps it further).
    #[arg(long, env = "HOTFLEET_AGENT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub agent_timeout: Duration,
    /// Agent calls in flight at once, across all rollouts, for a small fleet;
    /// the bound grows with the fleet (one per 4 agents, up to 1024).
    #[arg(long, env = "HOTFLEET_AGENT_CONCURRENCY", default_value_t = 64)]
    pub agent_concurrency: usize,
    /// Agent connections kept open at most (0: one per agent); beyond it the
    /// least recently used are closed (less memory, more reconnects). Any
    /// connection unused for 15 s is closed either way.
    #[arg(long, env = "HOTFLEET_AGENT_CHANNELS", default_value_t = 0)]
    pub agent_channels: usize,
    /// How long shutdown waits for in-flight work.
    #[arg(long, env = "HOTFLEET_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Mutual TLS (--tls-ca, --tls-cert, --tls-key) or --insecure: one is required.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Roles of certificate identities, lines `NAME ROLE` (viewer, operator,
    /// admin). When given, the only source of certificate roles (the
    /// `hotfleet-role=` OU of the dev CA is then ignored).
    #[arg(long, env = "HOTFLEET_OPERATORS")]
    pub operators: Option<PathBuf>,
    /// Bearer tokens, lines `SHA256HEX NAME ROLE` (hashes only; see `hotfleet auth token create`).
    #[arg(long, env = "HOTFLEET_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Certificate name of a `hotfleet-relay` trusted to forward its agents'
    /// calls, each on behalf of the agent certificate that relay verified.
    /// Repeatable; none by default (a relayed identity is then refused).
    #[arg(long = "relay", env = "HOTFLEET_RELAYS", value_delimiter = ',')]
    pub relays: Vec<String>,
    /// A node lost (no heartbeat) for longer than this is forgotten: its record is removed, audited.
    #[arg(long, env = "HOTFLEET_NODE_EXPIRY", default_value = "24h", value_parser = parse_duration)]
    pub node_expiry: Duration,
    /// Audit entries kept at most (the oldest go first).
    #[arg(long, env = "HOTFLEET_AUDIT_KEEP", default_value_t = 100_000)]
    pub audit_keep: u64,
    /// Audit entries older than this go (0 = no age limit; 2160h = 90 days).
    #[arg(long, env = "HOTFLEET_AUDIT_MAX_AGE", default_value = "2160h", value_parser = parse_duration)]
    pub audit_max_age: Duration,
    /// Deadline of one gRPC request (a stream: until its first message).
    #[arg(long, env = "HOTFLEET_REQUEST_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Operator requests in flight at once; more are refused RESOURCE_EXHAUSTED.
    #[arg(long, env = "HOTFLEET_OPERATOR_CONCURRENCY", default_value_t = 64)]
    pub operator_concurrency: usize,
    /// Agent registrations served at once; more are told to come back later
    /// (RESOURCE_EXHAUSTED with a wait that grows with the backlog).
    #[arg(long, env = "HOTFLEET_REGISTRATIONS_IN_FLIGHT", default_value_t = 256)]
    pub registrations_in_flight: usize,
    /// Open client connections at most (lowered to fit the open-files limit).
    #[arg(long, env = "HOTFLEET_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// A new connection that sends nothing (or too little) for this long is closed.
    #[arg(long, env = "HOTFLEET_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// HTTP/2 keepalive ping interval towards every client.
    #[arg(long, env = "HOTFLEET_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = parse_duration)]
    pub keepalive_interval: Duration,
    /// A client that does not answer a keepalive ping within this is disconnected.
    #[arg(long, env = "HOTFLEET_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub keepalive_timeout: Duration,
    /// Logs and metrics (`--log-format`, `--metrics-listen`): read by the binary.
    #[command(flatten)]
    pub obs: hotfleet_obs::ObsArgs,
}

/// Why the flags do not make a working coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// The coordinator's validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub trusted_keys: Vec<PathBuf>,
    pub heartbeat_interval: Duration,
    pub lost_after: u32,
    pub store: StoreKind,
    /// Set when `store` is etcd.
    pub etcd: Option<EtcdOptions>,
    pub leader_lease: Duration,
    pub advertise_addr: Option<String>,
    pub max_patch_bytes: usize,
    pub agent_timeout: Duration,
    pub agent_concurrency: usize,
    /// Agent connections kept open at most; 0: no cap.
    pub agent_channels: usize,
    pub drain_timeout: Duration,
    /// Connection and time limits of the gRPC server.
    pub limits: ServeLimits,
    /// Silence after which a lost node is forgotten.
    pub node_expiry: Duration,
    pub audit_retention: AuditRetention,
    /// Overrides `lost_after x heartbeat interval` (tests; not a flag).
    pub lost_timeout: Option<Duration>,
    /// Mutual TLS, or plaintext with every caller an admin (`--insecure`).
    pub transport: Transport,
    /// `--operators`: roles of certificate identities.
    pub operators: Option<PathBuf>,
    /// `--tokens`: hashed bearer tokens.
    pub tokens: Option<PathBuf>,
    /// `--relay`: certificate names of the relays trusted to speak for agents.
    pub relays: Vec<String>,
}

impl Config {
    /// Silence after which a node is lost: `lost_after` advertised intervals.
    pub fn lost_timeout(&self) -> Duration {
        self.lost_timeout.unwrap_or_else(|| {
            Duration::from_secs(u64::from(crate::registry::advertised_seconds(self.heartbeat_interval)))
                * self.lost_after.max(1)
        })
    }

    /// The address clients are sent to when this coordinator leads.
    pub fn advertise(&self) -> String {
        self.advertise_addr.clone().unwrap_or_else(|| format!("http://{}", self.listen))
    }

    /// Defaults for a store in `data_dir` (tests and embedding): plaintext
    /// and unauthenticated, as `--insecure`; the binary has no such default.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            data_dir: data_dir.into(),
            trusted_keys: Vec::new(),
            heartbeat_interval: Duration::from_secs(2),
            lost_after: 3,
            store: StoreKind::Embedded,
            etcd: None,
            leader_lease: Duration::from_secs(10),
            advertise_addr: None,
            max_patch_bytes: 8 * 1024 * 1024,
            agent_timeout: Duration::from_secs(30),
            agent_concurrency: 64,
            agent_channels: 0,
            drain_timeout: Duration::from_secs(10),
            limits: ServeLimits::default(),
            node_expiry: Duration::from_secs(24 * 3600),
            audit_retention: AuditRetention::default(),
            lost_timeout: None,
            transport: Transport::Insecure,
            operators: None,
            tokens: None,
            relays: Vec::new(),
        }
    }
}

impl TryFrom<Args> for Config {
    type Error = ConfigError;

    fn try_from(a: Args) -> Result<Self, ConfigError> {
        let invalid = |flag: &'static str, reason: &str| ConfigError::Invalid { flag, reason: reason.to_string() };
        if a.heartbeat_interval < Duration::from_millis(10) {
            return Err(invalid("heartbeat-interval", "must be at least 10ms"));
        }
        if a.lost_after == 0 {
            return Err(invalid("lost-after", "must be at least 1"));
        }
        if a.max_patch_bytes < 1024 {
            return Err(invalid("max-patch-bytes", "must be at least 1024"));
        }
        if a.agent_concurrency == 0 {
            return Err(invalid("agent-concurrency", "must be at least 1"));
        }
        let transport = a.tls.transport(OwnCert::Required)?;
        if a.audit_keep == 0 {
            return Err(invalid("audit-keep", "must be at least 1"));
        }
        let lost_for =
            Duration::from_secs(u64::from(crate::registry::advertised_seconds(a.heartbeat_interval))) * a.lost_after;
        if a.node_expiry <= lost_for {
            return Err(invalid(
                "node-expiry",
                "must be longer than the lost timeout (--lost-after x --heartbeat-interval)",
            ));
        }
        if a.operator_concurrency == 0 {
            return Err(invalid("operator-concurrency", "must be at least 1"));
        }
        if a.registrations_in_flight == 0 {
            return Err(invalid("registrations-in-flight", "must be at least 1"));
        }
        if a.max_connections < 16 {
            return Err(invalid("max-connections", "must be at least 16"));
        }
        for (flag, value) in [
            ("request-timeout", a.request_timeout),
            ("handshake-timeout", a.handshake_timeout),
            ("keepalive-interval", a.keepalive_interval),
            ("keepalive-timeout", a.keepalive_timeout),
        ] {
            if value < Duration::from_millis(100) {
                return Err(invalid(flag, "must be at least 100ms"));
            }
        }
        let etcd = etcd_options(&a)?;
        if a.leader_lease < Duration::from_secs(2) {
            return Err(invalid("leader-lease", "must be at least 2s (etcd's shortest lease)"));
        }
        if a.etcd_timeout < Duration::from_millis(100) {
            return Err(invalid("etcd-timeout", "must be at least 100ms"));
        }
        if let Some(addr) = &a.advertise_addr {
            // Read as every other peer address is (`host:port` or a URL), so the
            // agent's and the coordinator's flags take the same spelling.
            let url = hotfleet_proto::address::endpoint_url(addr);
            let dialable = (url.starts_with("http://") || url.starts_with("https://"))
                && url.parse::<tonic::transport::Uri>().is_ok_and(|u| u.port_u16().is_some());
            if !dialable {
                return Err(invalid(
                    "advertise-addr",
                    "must be host:port or an http(s):// URL with a port, such as 10.0.0.5:7700 or https://coord-1:7700",
                ));
            }
        } else if a.store == StoreKind::Etcd && a.listen.ip().is_unspecified() {
            return Err(invalid(
                "advertise-addr",
                "required with --store etcd when --listen is 0.0.0.0/[::]: followers send clients to this address",
            ));
        }
        for key in &a.trusted_keys {
            if !key.exists() {
                return Err(ConfigError::Invalid {
                    flag: "trusted-key",
                    reason: format!("{} does not exist (make one with `hotfleet keygen`)", key.display()),
                });
            }
        }
        Ok(Config {
            listen: a.listen,
            data_dir: a.data_dir,
            trusted_keys: a.trusted_keys,
            heartbeat_interval: a.heartbeat_interval,
            lost_after: a.lost_after,
            store: a.store,
            etcd,
            leader_lease: a.leader_lease,
            advertise_addr: a.advertise_addr.as_deref().map(hotfleet_proto::address::endpoint_url),
            max_patch_bytes: a.max_patch_bytes,
            agent_timeout: a.agent_timeout,
            agent_concurrency: a.agent_concurrency,
            agent_channels: a.agent_channels,
            drain_timeout: a.drain_timeout,
            limits: ServeLimits {
                request_timeout: a.request_timeout,
                operator_concurrency: a.operator_concurrency,
                registrations_in_flight: a.registrations_in_flight,
                max_connections: a.max_connections,
                handshake_timeout: a.handshake_timeout,
                keepalive_interval: a.keepalive_interval,
                keepalive_timeout: a.keepalive_timeout,
            },
            node_expiry: a.node_expiry,
            audit_retention: AuditRetention { keep: a.audit_keep, max_age: a.audit_max_age },
            lost_timeout: None,
            transport,
            operators: a.operators,
            tokens: a.tokens,
            relays: a.relays,
        })
    }
}

/// The etcd flags, checked: `None` for the embedded store.
fn etcd_options(a: &Args) -> Result<Option<EtcdOptions>, ConfigError> {
    let invalid = |flag: &'static str, reason: String| ConfigError::Invalid { flag, reason };
    let any_etcd_flag = !a.etcd_endpoints.is_empty()
        || a.etcd_user.is_some()
        || a.etcd_password.is_some()
        || a.etcd_ca.is_some()
        || a.etcd_cert.is_some()
        || a.etcd_key.is_some();
    if a.store != StoreKind::Etcd {
        if any_etcd_flag {
            return Err(invalid("store", "the --etcd-* settings need --store etcd".into()));
        }
        return Ok(None);
    }
    let mut endpoints = Vec::new();
    for raw in a.etcd_endpoints.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let url = hotfleet_proto::address::endpoint_url(raw);
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid("etcd-endpoints", format!("{raw:?} must be http://host:port or https://host:port")));
        }
        if url.parse::<tonic::transport::Uri>().is_err() {
            return Err(invalid("etcd-endpoints", format!("{raw:?} is not a valid address")));
        }
        endpoints.push(url);
    }
    if endpoints.is_empty() {
        return Err(invalid(
            "etcd-endpoints",
            "required with --store etcd, e.g. http://10.0.0.1:2379,http://10.0.0.2:2379".into(),
        ));
    }
    let user = match (&a.etcd_user, &a.etcd_password) {
        (Some(u), Some(p)) => Some((u.clone(), p.clone())),
        (None, None) => None,
        (Some(_), None) => return Err(invalid("etcd-password", "--etcd-user needs a password".into())),
        (None, Some(_)) => return Err(invalid("etcd-user", "--etcd-password needs a user".into())),
    };
    if a.etcd_cert.is_some() != a.etcd_key.is_some() {
        return Err(invalid("etcd-cert", "--etcd-cert and --etcd-key go together".into()));
    }
    for (flag, path) in [("etcd-ca", &a.etcd_ca), ("etcd-cert", &a.etcd_cert), ("etcd-key", &a.etcd_key)] {
        if let Some(path) = path {
            if !path.is_file() {
                return Err(invalid(flag, format!("{} does not exist", path.display())));
            }
        }
    }
    if a.etcd_prefix.trim().is_empty() {
        return Err(invalid("etcd-prefix", "must not be empty (e.g. /hotfleet/)".into()));
    }
    let mut options = EtcdOptions::new(endpoints, a.etcd_prefix.trim());
    options.user = user;
    options.ca = a.etcd_ca.clone();
    options.cert = a.etcd_cert.clone();
    options.key = a.etcd_key.clone();
    options.timeout = a.etcd_timeout;
    Ok(Some(options))
}

pub use hotfleet_proto::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_only_a_transport() {
        let args = Args::try_parse_from(["hotfleet-coordinator"]).expect("parse");
        let err = Config::try_from(args).expect_err("no TLS, no --insecure").to_string();
        assert!(err.contains("--tls-ca, --tls-cert and --tls-key") && err.contains("--insecure"), "{err}");
        let args = Args::try_parse_from(["hotfleet-coordinator", "--insecure"]).expect("parse");
        let config = Config::try_from(args).expect("valid");
        assert!(!config.transport.is_tls());
        assert_eq!(config.listen.to_string(), "127.0.0.1:7700");
        assert_eq!(config.data_dir, PathBuf::from("./hotfleet-data"));
        assert_eq!(config.store, StoreKind::Embedded);
        assert_eq!(config.limits, ServeLimits::default(), "the flags' defaults are the library's");
        assert_eq!(config.audit_retention, AuditRetention::default());
        assert_eq!(config.node_expiry, Config::new("x").node_expiry);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let args = Args::try_parse_from(["x", "--insecure", "--trusted-key", "/nonexistent/key.pub"]).expect("parse");
        let err = Config::try_from(args).expect_err("missing key");
        assert!(err.to_string().contains("--trusted-key"), "{err}");
        assert!(Args::try_parse_from(["x", "--store", "zookeeper"]).is_err());
        assert!(Args::try_parse_from(["x", "--heartbeat-interval", "soon"]).is_err());
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["hotfleet-coordinator", "--insecure"];
        all.extend_from_slice(args);
        Config::try_from(Args::try_parse_from(all).expect("parse"))
    }

    #[test]
    fn etcd_flags_are_checked() {
        let c = parse(&[
            "--store",
            "etcd",
            "--etcd-endpoints",
            "127.0.0.1:2379,http://10.0.0.2:2379",
            "--etcd-prefix",
            "/prod",
        ])
        .expect("valid");
        let etcd = c.etcd.clone().expect("etcd options");
        assert_eq!(etcd.endpoints, ["http://127.0.0.1:2379", "http://10.0.0.2:2379"]);
        assert_eq!(etcd.prefix, "/prod/");
        assert_eq!(c.advertise(), "http://127.0.0.1:7700");
        let err = |args: &[&str]| parse(args).expect_err("invalid").to_string();
        assert!(err(&["--store", "etcd"]).contains("--etcd-endpoints"));
        assert!(err(&["--node-expiry", "5s"]).contains("--node-expiry"), "not beyond the 6 s lost timeout");
        assert!(err(&["--max-connections", "1"]).contains("--max-connections"));
        assert!(err(&["--etcd-endpoints", "http://e:2379"]).contains("--store etcd"));
        assert!(err(&["--store", "etcd", "--etcd-endpoints", "e:1", "--etcd-user", "u"]).contains("password"));
        assert!(err(&["--store", "etcd", "--etcd-endpoints", "e:1", "--leader-lease", "1s"]).contains("--leader-lease"));
        assert!(err(&["--store", "etcd", "--etcd-endpoints", "e:1", "--listen", "0.0.0.0:7700"])
            .contains("--advertise-addr"));
        // host:port is read as the agent's flag reads it; a URL is kept as given.
        assert_eq!(parse(&["--advertise-addr", "coord-1:7700"]).expect("valid").advertise(), "http://coord-1:7700");
        assert_eq!(
            parse(&["--advertise-addr", "https://coord-1:7700"]).expect("valid").advertise(),
            "https://coord-1:7700"
        );
        for bad in ["coord-1", "ftp://coord-1:7700", "http://coord 1:7700", ""] {
            assert!(err(&["--advertise-addr", bad]).contains("--advertise-addr"), "{bad:?}");
        }
        assert!(err(&["--store", "etcd", "--etcd-endpoints", "e:1", "--etcd-cert", "/x"]).contains("--etcd-key"));
        assert!(err(&["--store", "etcd", "--etcd-endpoints", "e:1", "--etcd-ca", "/no/such/ca.pem"])
            .contains("does not exist"));
    }
}
