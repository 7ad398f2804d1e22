//! A `hotfleet-agent` process, found through the ready file it writes.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{io, proc::ready_grpc_addr, Keys, Layout, Proc, Result};

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
        Self::start_with_flags(layout, dir, node_id, coordinator, keys, labels, &[])
    }

    /// [`AgentProc::start`] with more flags (e.g. a relay's identity).
    pub fn start_with_flags(
        layout: &Layout,
        dir: &Path,
        node_id: &str,
        coordinator: Option<&str>,
        keys: &Keys,
        labels: &[(&str, &str)],
        extra: &[String],
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
        cmd.args(extra);
        for (k, v) in labels {
            cmd.args(["--label", &format!("{k}={v}")]);
        }
        let proc = Proc::spawn(&format!("agent-{node_id}"), cmd, &node_dir)?;
        let grpc = ready_grpc_addr(&proc, &ready, "the agent's ready file")?;
        Ok(AgentProc { proc, node_id: node_id.to_string(), grpc, socket, node_dir, data_dir })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }
}
