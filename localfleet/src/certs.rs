//! The fleet's development CA and certificates, made with `hotfleet certs
//! dev` (so the demo and the tests exercise the same command an operator
//! runs): the coordinator's, one per node (issued when its agent first
//! starts), and a few operators with each role.

use std::path::{Path, PathBuf};

use crate::{Layout, Result};

/// The operators every local fleet has: (name, role). `sre` is who the
/// fleet's CLI runs as; `demo` is the demo's.
pub const OPERATORS: [(&str, &str); 4] =
    [("sre", "admin"), ("demo", "admin"), ("oncall", "operator"), ("viewer", "viewer")];

/// One identity's PEM files, as a cert-manager Secret mounts them.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles { ca: dir.join("ca.crt"), cert: dir.join("tls.crt"), key: dir.join("tls.key") }
    }

    /// `--tls-ca CA --tls-cert CERT --tls-key KEY`.
    pub fn flags(&self) -> Vec<String> {
        let mut flags = Vec::new();
        for (flag, path) in [("--tls-ca", &self.ca), ("--tls-cert", &self.cert), ("--tls-key", &self.key)] {
            flags.push(flag.to_string());
            flags.push(path.display().to_string());
        }
        flags
    }
}

/// A development CA directory made by `hotfleet certs dev`.
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub dir: PathBuf,
}

impl DevCerts {
    /// A new CA in `dir` with the coordinator's and [`OPERATORS`]' certificates.
    pub fn generate(layout: &Layout, dir: &Path) -> Result<DevCerts> {
        let certs = DevCerts { dir: dir.to_path_buf() };
        let operators: Vec<String> = OPERATORS.iter().map(|(n, r)| format!("{n}:{r}")).collect();
        let mut args = vec!["certs", "dev", "--out"];
        let out = certs.dir.display().to_string();
        args.push(&out);
        for operator in &operators {
            args.extend(["--operator", operator.as_str()]);
        }
        layout.cli(&args)?;
        Ok(certs)
    }

    pub fn coordinator(&self) -> TlsFiles {
        TlsFiles::in_dir(&self.dir.join("coordinator"))
    }

    pub fn operator(&self, name: &str) -> TlsFiles {
        TlsFiles::in_dir(&self.dir.join("operators").join(name))
    }

    /// Relay `name`'s files, issued from the same CA on first use.
    pub fn relay(&self, layout: &Layout, name: &str) -> Result<TlsFiles> {
        self.issued(layout, "relays", "--relay", name)
    }

    /// Node `node_id`'s files, issued from the same CA on first use.
    pub fn node(&self, layout: &Layout, node_id: &str) -> Result<TlsFiles> {
        self.issued(layout, "nodes", "--node", node_id)
    }

    /// The files of `name` under `kind/`, issued with `hotfleet certs dev FLAG NAME` if missing.
    fn issued(&self, layout: &Layout, kind: &str, flag: &str, name: &str) -> Result<TlsFiles> {
        let files = TlsFiles::in_dir(&self.dir.join(kind).join(name));
        if !files.cert.is_file() {
            let out = self.dir.display().to_string();
            layout.cli(&["certs", "dev", "--out", &out, flag, name])?;
        }
        Ok(files)
    }
}
