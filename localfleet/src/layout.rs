//! Where the binaries, the repository files and Python are, and running the
//! `hotfleet` CLI from there.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::{io, FleetError, Result};

/// Where the binaries, the repository files and Python are.
#[derive(Debug, Clone)]
pub struct Layout {
    pub bin_dir: PathBuf,
    /// Repository root (holds `examples/` and `runtime/python/`).
    pub repo: PathBuf,
    pub python: String,
    /// Put before every CLI invocation's own arguments (a fleet's operator
    /// TLS flags, once it has them).
    pub cli_flags: Vec<String>,
}

impl Layout {
    /// The workspace this crate was built in, with its debug binaries (tests).
    pub fn for_workspace() -> Layout {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default();
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo.join("target"));
        Layout { bin_dir: target.join("debug"), repo, python: default_python(), cli_flags: Vec::new() }
    }

    /// Binaries beside the running executable; the repository found from the
    /// current directory upwards (or `repo` if given).
    pub fn beside_current_exe(repo: Option<PathBuf>, python: Option<String>) -> Result<Layout> {
        let exe = std::env::current_exe().map_err(io("locating the hotfleet executable"))?;
        let bin_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        let repo = match repo {
            Some(repo) => repo,
            None => find_repo().ok_or(FleetError::NoRepository)?,
        };
        if !repo.join("examples/zone_server/server.py").is_file() {
            return Err(FleetError::NoRepository);
        }
        Ok(Layout { bin_dir, repo, python: python.unwrap_or_else(default_python), cli_flags: Vec::new() })
    }

    pub fn bin(&self, name: &str) -> Result<PathBuf> {
        let path = self.bin_dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(FleetError::MissingBinary(path))
        }
    }

    /// Runs the `hotfleet` CLI; a non-zero exit is an error carrying its stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = self.cli_raw(args)?;
        if !out.status.success() {
            return Err(FleetError::Cli {
                args: args.join(" "),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// This layout, its CLI running with `flags` first (e.g. TLS flags).
    pub fn with_cli_flags(&self, flags: Vec<String>) -> Layout {
        Layout { cli_flags: flags, ..self.clone() }
    }

    /// Runs the `hotfleet` CLI and returns its raw output, whatever the exit code.
    pub fn cli_raw(&self, args: &[&str]) -> Result<Output> {
        Command::new(self.bin("hotfleet")?)
            .args(&self.cli_flags)
            .args(args)
            .output()
            .map_err(io("running the hotfleet CLI"))
    }
}

fn default_python() -> String {
    std::env::var("HOTFLEET_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn find_repo() -> Option<PathBuf> {
    let mut dir = std::env::current_dir().ok()?;
    loop {
        if dir.join("examples/zone_server/server.py").is_file() {
            return Some(dir);
        }
        if !dir.pop() {
            let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
            return built_in.join("examples/zone_server/server.py").is_file().then(|| built_in.to_path_buf());
        }
    }
}
