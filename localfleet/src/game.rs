//! Which example game a fleet's nodes run. Both speak the same player line
//! protocol (login, ping, attack on the training dummy, stats), so a
//! [`crate::Player`] probes either, and both write their port to a file.

/// An example game server under `examples/`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Game {
    /// `examples/zone_server`: the 20 Hz tick loop (`with rt.tick()`).
    #[default]
    ZoneServer,
    /// `examples/asyncio_arena`: an asyncio game using `asyncio_safe_point`.
    AsyncioArena,
}

impl Game {
    /// Its directory in the repository (also its `PYTHONPATH` entry).
    pub fn dir(self) -> &'static str {
        match self {
            Game::ZoneServer => "examples/zone_server",
            Game::AsyncioArena => "examples/asyncio_arena",
        }
    }

    /// The one package patches may touch.
    pub fn package(self) -> &'static str {
        match self {
            Game::ZoneServer => "zone",
            Game::AsyncioArena => "arena",
        }
    }
}
