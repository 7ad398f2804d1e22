//! A `hotfleet-agent` process, found through the ready file it writes.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::Value;

use crate::{io, wait_for, FleetError, Keys, Layout, Proc, Result};

/// A running `hotfleet-agent`.
pub struct AgentProc {
    pub proc: Proc,
    pub node_id: String,
    pub grpc: SocketAddr,
    pub socket: PathBuf,
    pub node_dir: PathBuf,
    pub data_dir: PathBuf,
}

impl AgentProc {
    /// Starts (or restarts) an agent on 127.0.0.1:0 whose files live in `dir/<node_id>`.
    pub fn start(
        layout: &Layout,
        dir: &Path,
        node_id: &str,
        coordinator: Option<&str>,
        keys: &Keys,
        labels: &[(&str, &str)],
    ) -> Result<Self> {
        let node_dir = dir.join(node_id);
        std::fs::create_dir_all(&node_dir).map_err(io(format!("creating {}", node_dir.display())))?;
        let socket = node_dir.join("agent.sock");
        let ready = node_dir.join("agent.ready");
        let _ = std::fs::remove_file(&ready);
        let data_dir = node_dir.join("data");
        let tls = keys.tls.node(layout, node_id)?;
        let mut cmd = Command::new(layout.bin("hotfleet-agent")?);
        cmd.args(["--listen", "127.0.0.1:0", "--node-id", node_id])
            .arg("--runtime-socket")
            .arg(&socket)
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--trusted-key")
            .arg(&keys.public)
            .args(tls.flags())
            .arg("--ready-file")
            .arg(&ready)
            .args(["--heartbeat-interval", "300ms", "--runtime-timeout", "10s"])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        if let Some(addr) = coordinator {
            cmd.args(["--coordinator", addr]);
        }
        for (k, v) in labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        let proc = Proc::spawn(&format!("agent-{node_id}"), cmd, &node_dir)?;
        let info: Value = wait_for("the agent's ready file", Duration::from_secs(20), Some(&proc.log), || {
            std::fs::read_to_string(&ready).ok().and_then(|t| serde_json::from_str(&t).ok())
        })?;
        let grpc = info["grpc"].as_str().and_then(|a| a.parse().ok()).ok_or_else(|| FleetError::Io {
            what: format!("reading {}", ready.display()),
            source: std::io::Error::other("no grpc address"),
        })?;
        Ok(AgentProc { proc, node_id: node_id.to_string(), grpc, socket, node_dir, data_dir })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}
