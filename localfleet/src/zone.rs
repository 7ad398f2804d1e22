//! An example game server process: the zone server (`examples/zone_server/server.py`)
//! or another [`Game`].

use std::{path::Path, process::Command, time::Duration};

use crate::{wait_for, Game, Layout, Proc, Result};

/// A running example game server (the zone server unless started as another [`Game`]).
pub struct ZoneProc {
    pub proc: Proc,
    pub name: String,
    pub port: u16,
}

impl ZoneProc {
    /// Starts a zone server, connected to the agent at `agent_socket` if given.
    pub fn start(
        layout: &Layout,
        dir: &Path,
        name: &str,
        agent_socket: Option<&Path>,
        build: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        Self::start_game(layout, dir, Game::ZoneServer, name, agent_socket, build, env)
    }

    /// Starts `game`'s server, connected to the agent at `agent_socket` if given.
    pub fn start_game(
        layout: &Layout,
        dir: &Path,
        game: Game,
        name: &str,
        agent_socket: Option<&Path>,
        build: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let port_file = dir.join(format!("{name}.port"));
        let _ = std::fs::remove_file(&port_file);
        let repo = &layout.repo;
        let game_dir = repo.join(game.dir());
        let mut cmd = Command::new(&layout.python);
        cmd.arg(game_dir.join("server.py"))
            .args(["--zone", name, "--port", "0"])
            .arg("--port-file")
            .arg(&port_file)
            .env("PYTHONPATH", format!("{}:{}", repo.join("runtime/python").display(), game_dir.display()))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("HOTFLEET_BUILD", build)
            .env_remove("HOTFLEET_AGENT_SOCKET")
            .envs(env.iter().copied());
        if let Some(socket) = agent_socket {
            cmd.env("HOTFLEET_AGENT_SOCKET", socket);
        }
        let proc = Proc::spawn(&format!("zone-{name}"), cmd, dir)?;
        let port = wait_for(&format!("zone {name} to listen"), Duration::from_secs(30), Some(&proc.log), || {
            std::fs::read_to_string(&port_file).ok().and_then(|t| t.trim().parse().ok())
        })?;
        Ok(ZoneProc { proc, name: name.to_string(), port })
    }
}
