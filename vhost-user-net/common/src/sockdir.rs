//! Where a daemon may put (or find) a Unix socket. A socket is only as safe as its directory:
//! whoever can write there can remove the socket and bind their own in its place, so a frontend
//! (or the control CLI) would talk to them. vhost-user gives the socket's owner the guest's
//! memory. So every Torii socket lives in a directory that only root and the daemon's own
//! user can change: the directory itself must not be writable by others, and no directory
//! above it may be writable by others unless it is sticky (as `/tmp` is, where nobody can
//! rename what they do not own). Each directory above the socket's own must belong to root or
//! to the daemon's user (the socket's own directory may belong to the peer, e.g. the VMM's
//! user). Close to OpenSSH's `StrictModes`, checked on the real path (symbolic links
//! resolved).

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Why a socket's directory was refused.
#[derive(Debug, thiserror::Error)]
pub enum SockDirError {
    #[error("socket {socket}: directory {dir} is writable by other users (mode {mode:04o}); use a directory only root or this user can write, e.g. /run/torii")]
    WorldWritable {
        socket: PathBuf,
        dir: PathBuf,
        mode: u32,
    },
    #[error("socket {socket}: directory {dir} belongs to user {uid}, neither root nor this daemon's user")]
    Owner {
        socket: PathBuf,
        dir: PathBuf,
        uid: u32,
    },
    #[error("socket {socket}: directory {dir}: {source}")]
    Io {
        socket: PathBuf,
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// The directory of `socket` (the current directory for a bare name).
fn parent(socket: &Path) -> &Path {
    match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Whether the directory `socket` would be in exists.
pub fn dir_exists(socket: &Path) -> bool {
    parent(socket).is_dir()
}

/// Checks the directory `socket` is (or will be) in, and every directory above it.
pub fn check(socket: &Path) -> Result<(), SockDirError> {
    check_from(socket, parent(socket), true)
}

/// Checks `dir` and the directories above it; `own`: `dir` is the socket's own directory,
/// which no other user may write even if it is sticky.
fn check_from(socket: &Path, dir: &Path, own: bool) -> Result<(), SockDirError> {
    let io = |dir: &Path, source| SockDirError::Io {
        socket: socket.to_path_buf(),
        dir: dir.to_path_buf(),
        source,
    };
    let real = std::fs::canonicalize(dir).map_err(|e| io(dir, e))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    for (i, d) in real.ancestors().enumerate() {
        let m = std::fs::metadata(d).map_err(|e| io(d, e))?;
        let mode = m.mode() & 0o7777;
        let sticky = mode & libc::S_ISVTX != 0;
        // The socket's own directory: no other user may write, sticky or not (a sticky
        // directory still lets them take a free name first).
        if mode & 0o002 != 0 && ((own && i == 0) || !sticky) {
            return Err(SockDirError::WorldWritable {
                socket: socket.to_path_buf(),
                dir: d.to_path_buf(),
                mode,
            });
        }
        // The socket's own directory may belong to the peer (a VMM's user whose socket a
        // client-mode port connects to): its owner is on the other end anyway.
        if (!own || i > 0) && m.uid() != 0 && m.uid() != me {
            return Err(SockDirError::Owner {
                socket: socket.to_path_buf(),
                dir: d.to_path_buf(),
                uid: m.uid(),
            });
        }
    }
    Ok(())
}

/// Creates the missing directories of `socket` (mode 0750: the daemon's user, and its group
/// for the frontends it serves), then [`check`]s them. Nothing is created under a directory
/// that fails the check.
pub fn prepare(socket: &Path) -> Result<(), SockDirError> {
    prepare_for(socket, None)
}

/// [`prepare`], for a socket that the daemon of another user binds: torii-cni, as root, makes
/// the pod directories where a non-root data plane binds its sockets. With `owner`
/// (uid, gid), the socket's own directory, if made here, is handed to that user (mode 0750),
/// and the directories made above it may be traversed but not listed by others (0751).
pub fn prepare_for(socket: &Path, owner: Option<(u32, u32)>) -> Result<(), SockDirError> {
    let dir = parent(socket);
    let io = |d: &Path, source| SockDirError::Io {
        socket: socket.to_path_buf(),
        dir: d.to_path_buf(),
        source,
    };
    let missing: Vec<&Path> = dir
        .ancestors()
        .filter(|d| !d.as_os_str().is_empty())
        .take_while(|d| !d.is_dir())
        .collect();
    if let Some(existing) = dir
        .ancestors()
        .find(|d| d.as_os_str().is_empty() || d.is_dir())
    {
        let existing = if existing.as_os_str().is_empty() {
            Path::new(".")
        } else {
            existing
        };
        if existing != dir {
            check_from(socket, existing, false)?;
        }
    }
    for d in missing.iter().rev() {
        let own = *d == dir;
        match std::fs::DirBuilder::new().mode(0o750).create(d) {
            Ok(()) => {}
            // Made meanwhile by someone else: checked below like any existing directory.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io(d, e)),
        }
        if let Some((uid, gid)) = owner {
            use std::os::unix::fs::PermissionsExt;
            let mode = if own { 0o750 } else { 0o751 };
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode))
                .map_err(|e| io(d, e))?;
            if own {
                std::os::unix::fs::chown(d, Some(uid), Some(gid)).map_err(|e| io(d, e))?;
            }
        }
    }
    check(socket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("torii-sockdir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_private_directory_is_accepted() {
        let d = tmp("private");
        check(&d.join("a.sock")).unwrap();
        chmod(&d, 0o750);
        check(&d.join("a.sock")).unwrap();
        // Group-writable is the operator's choice (a group shared with the VMM's user).
        chmod(&d, 0o770);
        check(&d.join("a.sock")).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_world_writable_directory_is_refused_sticky_or_not() {
        let d = tmp("world");
        for mode in [0o777, 0o1777, 0o773] {
            chmod(&d, mode);
            let e = check(&d.join("a.sock")).unwrap_err();
            assert!(
                matches!(&e, SockDirError::WorldWritable { dir, .. } if *dir == d),
                "{mode:o}: {e}"
            );
            assert!(e.to_string().contains("writable by other users"), "{e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_world_writable_parent_is_refused_unless_sticky() {
        let d = tmp("parent");
        let sub = d.join("sub");
        std::fs::create_dir(&sub).unwrap();
        chmod(&sub, 0o700);
        chmod(&d, 0o777);
        let e = check(&sub.join("a.sock")).unwrap_err();
        assert!(
            matches!(&e, SockDirError::WorldWritable { dir, .. } if *dir == d),
            "{e}"
        );
        // Sticky, as /tmp: others cannot rename `sub`.
        chmod(&d, 0o1777);
        check(&sub.join("a.sock")).unwrap();
        chmod(&d, 0o755);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_symlink_is_judged_by_where_it_leads() {
        let d = tmp("link");
        let open = d.join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let link = d.join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        assert!(matches!(
            check(&link.join("a.sock")),
            Err(SockDirError::WorldWritable { .. })
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_parent_of_another_user_is_refused_the_peers_own_directory_is_not() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!("this test changes a directory's owner: run it as root");
        }
        let d = tmp("owner");
        let sub = d.join("sub");
        std::fs::create_dir(&sub).unwrap();
        std::os::unix::fs::chown(&sub, Some(65534), None).unwrap();
        // The socket's directory belongs to the peer: accepted.
        check(&sub.join("a.sock")).unwrap();
        // A directory above it that another user owns: they could rename `sub` away.
        std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
        let e = check(&sub.join("a.sock")).unwrap_err();
        assert!(matches!(e, SockDirError::Owner { uid: 65534, .. }), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn prepare_makes_missing_directories_private() {
        let d = tmp("prepare");
        let sock = d.join("a/b/c.sock");
        prepare(&sock).unwrap();
        let mode = std::fs::metadata(d.join("a/b")).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o007, 0, "{mode:o}");
        let e = check(Path::new("/nonexistent-torii-dir/x.sock")).unwrap_err();
        assert!(matches!(e, SockDirError::Io { .. }), "{e}");
        // Under a directory others can write, nothing is made.
        let open = d.join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let e = prepare(&open.join("pod/a.sock")).unwrap_err();
        assert!(matches!(e, SockDirError::WorldWritable { .. }), "{e}");
        assert!(!open.join("pod").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn prepare_for_hands_the_sockets_own_directory_to_the_daemons_user() {
        let d = tmp("prepare-for");
        let sock = d.join("pods/p1/a.sock");
        let nobody = 65534;
        prepare_for(&sock, Some((nobody, nobody))).unwrap();
        let own = std::fs::metadata(d.join("pods/p1")).unwrap();
        assert_eq!(
            (own.uid(), own.gid(), own.mode() & 0o777),
            (nobody, nobody, 0o750)
        );
        let above = std::fs::metadata(d.join("pods")).unwrap();
        assert_eq!((above.uid(), above.mode() & 0o777), (0, 0o751));
        // A directory that was there is left as it is.
        let kept = d.join("kept");
        std::fs::create_dir(&kept).unwrap();
        chmod(&kept, 0o700);
        prepare_for(&kept.join("b.sock"), Some((nobody, nobody))).unwrap();
        let m = std::fs::metadata(&kept).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o700));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
