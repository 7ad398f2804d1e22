//! The runtime socket's two local barriers, so only the game processes the
//! operator meant can drive a session (and through it report a patch stack
//! or answer a prepare):
//!
//! - [`bind`]: the socket exists only with its final mode. It is bound
//!   inside a fresh directory of mode 0700, given its mode there, then
//!   renamed into place: there is no moment at which another user could
//!   connect to a socket still carrying the umask's mode (chmod after bind
//!   would leave one), and no process-wide umask is touched.
//! - [`PeerPolicy`]: every accepted connection's peer uid (SO_PEERCRED,
//!   from the kernel, not from anything the peer says) must be one allowed
//!   by `--runtime-allowed-uid`, by default the agent's own uid. Root is
//!   allowed only if named there (or if the agent itself runs as root). The
//!   policy also sets the socket's mode ([`PeerPolicy::socket_mode`]):
//!   owner-only while only the agent's own uid (or root) may connect; open
//!   to connect once other uids are allowed, the uid check then being the
//!   barrier (file modes cannot name a list of uids).

use std::{
    fs,
    os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use tokio::net::{UnixListener, UnixStream};

/// The socket's mode while only the agent's own uid may connect.
pub const OWNER_ONLY: u32 = 0o600;

/// The socket's mode once other uids may connect (each peer's uid checked).
pub const ANY_CONNECTS: u32 = 0o666;

/// Binds the runtime socket at `path` with `mode` from its first moment,
/// replacing a stale socket file atomically.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "agent.sock".into());
    let private = parent.join(format!(".{name}.{}.bind", std::process::id()));
    // Left over by a crash of an agent that had this pid: ours to remove.
    match fs::remove_dir_all(&private) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    fs::DirBuilder::new().mode(0o700).create(&private)?;
    let result = bind_via(&private, path, mode);
    let _ = fs::remove_dir_all(&private);
    result
}

fn bind_via(private: &Path, path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    // Made just now by us with 0700 (a umask only takes bits away); checked
    // anyway, without following a link, in case the directory is shared.
    let meta = fs::symlink_metadata(private)?;
    if !meta.is_dir() || meta.uid() != effective_uid() || meta.permissions().mode() & 0o077 != 0 {
        return Err(std::io::Error::other(format!("{} is not a private directory of this agent", private.display())));
    }
    let staged = private.join("sock");
    let listener = UnixListener::bind(&staged)?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(mode))?;
    fs::rename(&staged, path)?;
    Ok(listener)
}

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum PeerRefused {
    #[error("peer uid {uid} is not allowed on the runtime socket (allowed: {allowed:?}; see --runtime-allowed-uid)")]
    Uid { uid: u32, allowed: Vec<u32> },
    #[error("cannot read the peer's credentials (SO_PEERCRED): {0}")]
    Credentials(std::io::Error),
}

/// Which peer uids may connect to the runtime socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPolicy {
    allowed: Vec<u32>,
}

impl PeerPolicy {
    /// The uids configured (`--runtime-allowed-uid`), or the agent's own
    /// effective uid when none are.
    pub fn new(configured: &[u32]) -> Self {
        if configured.is_empty() {
            Self::only(&[effective_uid()])
        } else {
            Self::only(configured)
        }
    }

    /// Exactly these uids.
    pub fn only(uids: &[u32]) -> Self {
        Self { allowed: uids.to_vec() }
    }

    pub fn allowed(&self) -> &[u32] {
        &self.allowed
    }

    /// The socket's mode: [`OWNER_ONLY`] while every allowed uid is the
    /// agent's own or root (which file modes do not stop), else
    /// [`ANY_CONNECTS`], or the other allowed uids could not connect at all.
    pub fn socket_mode(&self) -> u32 {
        let own = effective_uid();
        if self.allowed.iter().all(|uid| *uid == own || *uid == 0) {
            OWNER_ONLY
        } else {
            ANY_CONNECTS
        }
    }

    /// The peer's uid if it is allowed.
    pub fn check(&self, stream: &UnixStream) -> Result<u32, PeerRefused> {
        let uid = stream.peer_cred().map_err(PeerRefused::Credentials)?.uid();
        if self.allowed.contains(&uid) {
            Ok(uid)
        } else {
            Err(PeerRefused::Uid { uid, allowed: self.allowed.clone() })
        }
    }
}

/// The agent's effective uid.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid takes nothing, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_is_born_owner_only_and_replaces_a_stale_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("run/agent.sock");
        let first = bind(&path, OWNER_ONLY).expect("bind");
        assert_eq!(fs::metadata(&path).expect("socket").permissions().mode() & 0o777, OWNER_ONLY);
        drop(first);
        // A stale socket file from an agent that died: replaced, with its own mode.
        let listener = bind(&path, ANY_CONNECTS).expect("bind again");
        assert_eq!(fs::metadata(&path).expect("socket").permissions().mode() & 0o777, ANY_CONNECTS);
        let leftovers: Vec<_> =
            fs::read_dir(path.parent().expect("dir")).expect("list").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(leftovers, ["agent.sock"], "the private bind directory is gone");
        let client = UnixStream::connect(&path).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        drop((client, server));
    }

    #[tokio::test]
    async fn a_peer_is_admitted_only_with_an_allowed_uid() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("agent.sock");
        let listener = bind(&path, OWNER_ONLY).expect("bind");
        let _client = UnixStream::connect(&path).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let me = effective_uid();
        assert_eq!(PeerPolicy::new(&[]).check(&stream).expect("own uid by default"), me);
        let other = me.wrapping_add(4242);
        let err = PeerPolicy::new(&[other]).check(&stream).expect_err("only another uid allowed");
        assert!(matches!(&err, PeerRefused::Uid { uid, .. } if *uid == me), "{err}");
        assert!(err.to_string().contains("--runtime-allowed-uid"), "{err}");
        assert_eq!(PeerPolicy::only(&[other, me]).check(&stream).expect("listed"), me);
    }

    #[test]
    fn the_socket_opens_to_others_only_when_other_uids_are_allowed() {
        let me = effective_uid();
        assert_eq!(PeerPolicy::new(&[]).socket_mode(), OWNER_ONLY);
        assert_eq!(PeerPolicy::only(&[me, 0]).socket_mode(), OWNER_ONLY, "root passes file modes anyway");
        assert_eq!(PeerPolicy::only(&[me.wrapping_add(4242)]).socket_mode(), ANY_CONNECTS);
    }
}
