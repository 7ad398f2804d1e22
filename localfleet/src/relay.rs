//! A `hotfleet-relay` process, found through the ready file it writes.

use std::{net::SocketAddr, path::Path, process::Command};

use crate::{io, proc::ready_grpc_addr, Keys, Layout, Proc, Result};

/// A running `hotfleet-relay`, with TLS under the relay certificate `name`.
pub struct RelayProc {
    pub proc: Proc,
    pub name: String,
    pub grpc: SocketAddr,
}

impl RelayProc {
    /// Starts relay `name` on `addr` (port 0 picks one) in front of
    /// `coordinators` (a comma-separated list); its files live in `dir/<name>`.
    pub fn start(
        layout: &Layout,
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        coordinators: &str,
        keys: &Keys,
    ) -> Result<Self> {
        let relay_dir = dir.join(name);
        std::fs::create_dir_all(&relay_dir).map_err(io(format!("creating {}", relay_dir.display())))?;
        let ready = relay_dir.join("relay.ready");
        let _ = std::fs::remove_file(&ready);
        let tls = keys.tls.relay(layout, name)?;
        let mut cmd = Command::new(layout.bin("hotfleet-relay")?);
        cmd.args(["--listen", &addr.to_string(), "--coordinator", coordinators])
            .args(tls.flags())
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        let proc = Proc::spawn(&format!("relay-{name}"), cmd, &relay_dir)?;
        let grpc = ready_grpc_addr(&proc, &ready, "the relay's ready file")?;
        Ok(RelayProc { proc, name: name.to_string(), grpc })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The flags an agent behind this relay runs with.
    pub fn agent_flags(&self) -> Vec<String> {
        vec!["--relay-identity".into(), self.name.clone()]
    }
}
