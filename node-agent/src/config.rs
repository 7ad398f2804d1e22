//! Agent configuration: flags and environment, validated before anything starts.

use std::{collections::BTreeMap, net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use hotfleet_proto::{
    duration::parse_duration,
    tls::{TlsArgs, DEFAULT_COORDINATOR_IDENTITY},
};

/// `hotfleet-agent`: serves the game processes of one host to the coordinator.
#[derive(Debug, Clone, Parser)]
#[command(name = "hotfleet-agent", version, about)]
pub struct AgentConfig {
    /// Address the agent's gRPC service listens on (the coordinator calls it).
    #[arg(long, env = "HOTFLEET_AGENT_LISTEN", default_value = "127.0.0.1:7701")]
    pub listen: SocketAddr,

    /// Address the coordinator should call back on (default: the bound listen address).
    #[arg(long, env = "HOTFLEET_AGENT_ADVERTISE")]
    pub advertise_addr: Option<String>,

    /// Coordinator URL, e.g. http://127.0.0.1:7700, or a comma-separated list
    /// of every coordinator of an HA deployment (the agent follows the
    /// leader). Without it the agent runs standalone (tests, local debugging).
    #[arg(long, env = "HOTFLEET_COORDINATOR")]
    pub coordinator: Option<String>,

    /// This node's id (default: the host name).
    #[arg(long, env = "HOTFLEET_NODE_ID")]
    pub node_id: Option<String>,

    /// Labels the coordinator selects nodes by, e.g. --label region=eu --label zone=z1.
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,

    /// Unix socket the game processes' runtimes connect to (created with its
    /// final mode: owner-only unless --runtime-allowed-uid names other uids).
    #[arg(long, env = "HOTFLEET_AGENT_SOCKET", default_value = "/run/hotfleet/agent.sock")]
    pub runtime_socket: PathBuf,

    /// Uid a game process may connect to the runtime socket as (checked with
    /// SO_PEERCRED; a refused peer is logged and closed). Repeatable. Default:
    /// the agent's own uid only; root only if listed (or the agent's own).
    #[arg(long = "runtime-allowed-uid", env = "HOTFLEET_AGENT_RUNTIME_ALLOWED_UIDS", value_delimiter = ',')]
    pub runtime_allowed_uids: Vec<u32>,

    /// Directory for the patch cache and the persisted fencing epoch.
    #[arg(long, env = "HOTFLEET_AGENT_DATA_DIR", default_value = "/var/lib/hotfleet-agent")]
    pub data_dir: PathBuf,

    /// Public key file (or directory of *.pub files) whose signatures are trusted. Repeatable.
    #[arg(long = "trusted-key", env = "HOTFLEET_TRUSTED_KEYS", value_delimiter = ',', required = true)]
    pub trusted_keys: Vec<PathBuf>,

    /// How long a prepared patch waits for commit or abort before the agent
    /// presumes abort, counted from the prepare, the latest command naming
    /// its rollout, or the latest leader heartbeat answer listing that
    /// rollout as live: a rollout's prepares live as long as the rollout
    /// while a leader answers (a rollout may set its own TTL).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub prepare_ttl: Duration,

    /// Seconds between heartbeats to the coordinator.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// Once listening, write {"grpc": ADDR, "socket": PATH, "pid": PID} here
    /// (for supervisors and tests that start the agent on port 0).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,

    /// How long a runtime may take to answer a prepare/commit/rollback.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub runtime_timeout: Duration,

    /// A runtime that says nothing this long although asked (a silent client,
    /// a stopped process) has its session closed; it reconnects when it runs
    /// again. Must be longer than --runtime-timeout.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub session_idle_timeout: Duration,

    /// Mutual TLS (--tls-ca, --tls-cert, --tls-key: this node's certificate,
    /// whose CN or DNS name is the node id) or --insecure: one is required.
    #[command(flatten)]
    pub tls: TlsArgs,

    /// The coordinator's certificate identity (CN or DNS name): the only
    /// client whose commands this agent obeys, and the name it verifies
    /// when it calls a coordinator.
    #[arg(long, env = "HOTFLEET_COORDINATOR_IDENTITY", default_value = DEFAULT_COORDINATOR_IDENTITY)]
    pub coordinator_identity: String,

    /// When --coordinator is a `hotfleet-relay`: the relay's certificate
    /// identity, which this agent verifies when it calls (commands still come
    /// from the coordinator, through the relay).
    #[arg(long, env = "HOTFLEET_RELAY_IDENTITY")]
    pub relay_identity: Option<String>,

    /// Logs and metrics (`--log-format`, `--metrics-listen`).
    #[command(flatten)]
    pub obs: hotfleet_obs::ObsArgs,
}

impl AgentConfig {
    pub fn labels_map(&self) -> BTreeMap<String, String> {
        self.labels.iter().cloned().collect()
    }

    pub fn resolved_node_id(&self) -> String {
        self.node_id.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "hotfleet-node".to_string())
        })
    }
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| format!("label {text:?} must be KEY=VALUE"))?;
    if key.is_empty() {
        return Err(format!("label {text:?} has an empty key"));
    }
    Ok((key.to_string(), value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse() {
        assert_eq!(parse_label("region=eu"), Ok(("region".into(), "eu".into())));
        assert!(parse_label("region").is_err());
    }
}
