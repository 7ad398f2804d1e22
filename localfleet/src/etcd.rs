//! A single-member etcd on loopback for the etcd-backed coordinators.

use std::{
    io::Write,
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::{free_port, wait_for, FleetError, Proc, Result};

/// A single-member etcd on loopback with its own data directory, started
/// from the `etcd` binary on the PATH (or `$HOTFLEET_ETCD`).
pub struct EtcdProc {
    pub proc: Proc,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    binary: PathBuf,
    dir: PathBuf,
}

fn find_etcd() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("HOTFLEET_ETCD").map(PathBuf::from) {
        return if path.is_file() { Ok(path) } else { Err(FleetError::MissingEtcd) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
        .ok_or(FleetError::MissingEtcd)
}

/// `GET /health` on etcd's client port: `{"health":"true"}` once it serves.
fn etcd_healthy(port: u16) -> bool {
    use std::io::Read;
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.contains("\"health\":\"true\"")
}

fn launch_etcd(binary: &Path, dir: &Path, data_dir: &Path, client_port: u16, peer_port: u16) -> Result<Proc> {
    let client = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = Command::new(binary);
    cmd.args(["--name", "hotfleet-test", "--logger=zap", "--log-outputs=stderr"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("hotfleet-test={peer}"), "--initial-cluster-state", "new"]);
    let proc = Proc::spawn("etcd", cmd, dir)?;
    wait_for("etcd to be healthy", Duration::from_secs(30), Some(&proc.log), || {
        etcd_healthy(client_port).then_some(())
    })?;
    Ok(proc)
}

impl EtcdProc {
    /// Starts etcd with its data in `dir/etcd-data` on two free loopback ports.
    pub fn start(dir: &Path) -> Result<EtcdProc> {
        let binary = find_etcd()?;
        let (client_port, peer_port) = (free_port()?, free_port()?);
        let data_dir = dir.join("etcd-data");
        let proc = launch_etcd(&binary, dir, &data_dir, client_port, peer_port)?;
        Ok(EtcdProc { proc, client_port, peer_port, data_dir, binary, dir: dir.to_path_buf() })
    }

    fn launch(&self) -> Result<Proc> {
        launch_etcd(&self.binary, &self.dir, &self.data_dir, self.client_port, self.peer_port)
    }

    /// The client URL (`--etcd-endpoints`).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL) and starts it again on the same ports and data.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill();
        self.proc = self.launch()?;
        Ok(())
    }

    /// Kills etcd (SIGKILL); [`EtcdProc::start_again`] brings it back on the same data.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts a killed etcd again on the same ports and data.
    pub fn start_again(&mut self) -> Result<()> {
        self.proc = self.launch()?;
        Ok(())
    }
}
