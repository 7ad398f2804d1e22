//! Flags and environment → a validated [`Config`]. Parsing fails fast with a
//! message naming the flag; nothing else in the coordinator reads flags.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

/// State store backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreKind {
    /// One redb file in --data-dir (single coordinator).
    Embedded,
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
    /// Largest patch bundle accepted, in bytes.
    #[arg(long, env = "HOTFLEET_MAX_PATCH_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_patch_bytes: usize,
    /// Deadline of one call to an agent (a step's deadline caps it further).
    #[arg(long, env = "HOTFLEET_AGENT_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub agent_timeout: Duration,
    /// Agent calls in flight at once, across all rollouts.
    #[arg(long, env = "HOTFLEET_AGENT_CONCURRENCY", default_value_t = 64)]
    pub agent_concurrency: usize,
    /// How long shutdown waits for in-flight work.
    #[arg(long, env = "HOTFLEET_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// Why the flags do not make a working coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
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
    pub max_patch_bytes: usize,
    pub agent_timeout: Duration,
    pub agent_concurrency: usize,
    pub drain_timeout: Duration,
    /// Overrides `lost_after x heartbeat interval` (tests; not a flag).
    pub lost_timeout: Option<Duration>,
}

impl Config {
    /// Silence after which a node is lost: `lost_after` advertised intervals.
    pub fn lost_timeout(&self) -> Duration {
        self.lost_timeout.unwrap_or_else(|| {
            Duration::from_secs(u64::from(crate::registry::advertised_seconds(self.heartbeat_interval)))
                * self.lost_after.max(1)
        })
    }

    /// Defaults for a store in `data_dir` (tests and embedding).
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            data_dir: data_dir.into(),
            trusted_keys: Vec::new(),
            heartbeat_interval: Duration::from_secs(2),
            lost_after: 3,
            store: StoreKind::Embedded,
            max_patch_bytes: 8 * 1024 * 1024,
            agent_timeout: Duration::from_secs(30),
            agent_concurrency: 64,
            drain_timeout: Duration::from_secs(10),
            lost_timeout: None,
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
            max_patch_bytes: a.max_patch_bytes,
            agent_timeout: a.agent_timeout,
            agent_concurrency: a.agent_concurrency,
            drain_timeout: a.drain_timeout,
            lost_timeout: None,
        })
    }
}

pub use hotfleet_proto::duration::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_flags() {
        let args = Args::try_parse_from(["hotfleet-coordinator"]).expect("parse");
        let config = Config::try_from(args).expect("valid");
        assert_eq!(config.listen.to_string(), "127.0.0.1:7700");
        assert_eq!(config.data_dir, PathBuf::from("./hotfleet-data"));
        assert_eq!(config.store, StoreKind::Embedded);
    }

    #[test]
    fn bad_values_name_the_flag() {
        let args = Args::try_parse_from(["x", "--trusted-key", "/nonexistent/key.pub"]).expect("parse");
        let err = Config::try_from(args).expect_err("missing key");
        assert!(err.to_string().contains("--trusted-key"), "{err}");
        assert!(Args::try_parse_from(["x", "--store", "zookeeper"]).is_err());
        assert!(Args::try_parse_from(["x", "--heartbeat-interval", "soon"]).is_err());
    }
}
