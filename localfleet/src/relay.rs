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
    /// `coordinators` (a comma-separated list), with TLS under the relay
    /// certificate `name`; its files live in `dir/<name>`.
    pub fn start(
        layout: &Layout,
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        coordinators: &str,
        keys: &Keys,
    ) -> Result<Self> {
        let tls = keys.tls.relay(layout, name)?;
        Self::spawn(layout, dir, name, addr, coordinators, tls.flags())
    }

    /// A plaintext relay (`--insecure`) in front of a plaintext coordinator,
    /// with `extra` flags: the fleet-scale benchmark's.
    pub fn start_insecure(
        layout: &Layout,
        dir: &Path,
        name: &str,
        coordinators: &str,
        extra: &[String],
    ) -> Result<Self> {
        let mut flags = vec!["--insecure".to_string()];
        flags.extend_from_slice(extra);
        Self::spawn(layout, dir, name, ([127, 0, 0, 1], 0).into(), coordinators, flags)
    }

    fn spawn(
        layout: &Layout,
        dir: &Path,
        name: &str,
        addr: SocketAddr,
        coordinators: &str,
        flags: Vec<String>,
    ) -> Result<Self> {
        let relay_dir = dir.join(name);
        std::fs::create_dir_all(&relay_dir).map_err(io(format!("creating {}", relay_dir.display())))?;
        let ready = relay_dir.join("relay.ready");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = Command::new(layout.bin("hotfleet-relay")?);
        cmd.args(["--listen", &addr.to_string(), "--coordinator", coordinators])
            .args(flags)
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
