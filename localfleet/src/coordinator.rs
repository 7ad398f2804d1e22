//! A `hotfleet-coordinator` process on the embedded store or a shared etcd.

use std::{
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{wait_for, Keys, Layout, Proc, Result};

/// Where a coordinator keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// Its own redb file under the fleet directory.
    Embedded,
    /// A shared etcd: `--store etcd --etcd-endpoints ENDPOINTS --etcd-prefix PREFIX`.
    Etcd { endpoints: String, prefix: String },
}

/// A running `hotfleet-coordinator`.
pub struct CoordinatorProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl CoordinatorProc {
    /// Starts a coordinator on `port` with its embedded store in
    /// `dir/coordinator-data` (the same call on the same `dir` restarts it on
    /// the same store).
    pub fn start(layout: &Layout, dir: &Path, keys: &Keys, port: u16, extra: &[&str]) -> Result<Self> {
        Self::start_on(layout, dir, keys, port, &StoreSpec::Embedded, extra)
    }

    /// Starts a coordinator on `port` with the given store.
    pub fn start_on(
        layout: &Layout,
        dir: &Path,
        keys: &Keys,
        port: u16,
        store: &StoreSpec,
        extra: &[&str],
    ) -> Result<Self> {
        Self::spawn(layout, dir, keys, port, store, true, extra)
    }

    /// Starts a plaintext coordinator (`--insecure`: every caller is admin,
    /// agents are not asked for certificates), for the fleet-scale benchmark,
    /// whose simulated agents share one listener and so cannot each present
    /// a node's certificate.
    pub fn start_insecure_on(
        layout: &Layout,
        dir: &Path,
        keys: &Keys,
        port: u16,
        store: &StoreSpec,
        extra: &[&str],
    ) -> Result<Self> {
        Self::spawn(layout, dir, keys, port, store, false, extra)
    }

    fn spawn(
        layout: &Layout,
        dir: &Path,
        keys: &Keys,
        port: u16,
        store: &StoreSpec,
        tls: bool,
        extra: &[&str],
    ) -> Result<Self> {
        let data_dir = match store {
            StoreSpec::Embedded => dir.join("coordinator-data"),
            // Unused by the etcd store; distinct so nothing could ever share it.
            StoreSpec::Etcd { .. } => dir.join(format!("coordinator-{port}-data")),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(layout.bin("hotfleet-coordinator")?);
        cmd.args(["--listen", &addr.to_string()])
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--trusted-key")
            .arg(&keys.public)
            .args(if tls { keys.tls.coordinator().flags() } else { vec!["--insecure".to_string()] })
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        if let StoreSpec::Etcd { endpoints, prefix } = store {
            cmd.args(["--store", "etcd", "--etcd-endpoints", endpoints, "--etcd-prefix", prefix]);
        }
        cmd.args(extra);
        let proc = Proc::spawn(&format!("coordinator-{port}"), cmd, dir)?;
        wait_for("the coordinator to listen", Duration::from_secs(20), Some(&proc.log), || {
            TcpStream::connect(addr).ok()
        })?;
        Ok(CoordinatorProc { proc, addr, data_dir })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
