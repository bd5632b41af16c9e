//! `mount` and `unmount`: kernel file systems and bind mounts where the host says — a
//! container's proc, sys, dev… inside its root file system — and mounts taken down, one or a
//! whole tree.

use std::os::fd::AsFd;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::mounts::{self, Create};
use crate::protocol::{quote, RpcError};
use crate::server::Roots;

/// The file system types `mount` takes; `bind` (or `none` with a `bind` or `rbind` option)
/// is a bind mount.
pub const FSTYPES: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup2", "bind", "none",
];

/// `mount` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// What to mount: a name for the kernel's file systems (`proc`, `shm`, …), an absolute
    /// guest path for a bind.
    pub source: String,
    /// Where: an absolute path (inside `root` if given).
    pub target: String,
    /// One of [`FSTYPES`].
    #[serde(default = "none")]
    pub fstype: String,
    /// OCI's mount options, one an entry (or comma-separated): flags, propagation, and the
    /// rest for the file system.
    #[serde(default)]
    pub options: Vec<String>,
    /// Make the target if missing: the directories, or an empty file for a bind of a file.
    #[serde(default = "yes")]
    pub mkdir: bool,
    /// A directory `target` is taken in, as if it were `/` (a container's root file system):
    /// symlinks on the way stay inside it.
    #[serde(default)]
    pub root: Option<String>,
}

fn none() -> String {
    "none".into()
}

fn yes() -> bool {
    true
}

/// `unmount` parameters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unmount {
    pub target: String,
    /// Every mount at or below `target` too, deepest first.
    #[serde(default)]
    pub recursive: bool,
    /// Lazily (`MNT_DETACH`): a busy mount is detached now and goes once unused.
    #[serde(default)]
    pub detach: bool,
}

fn bad(msg: impl Into<String>) -> RpcError {
    RpcError::new("bad_params", msg)
}

fn failed(msg: impl Into<String>) -> RpcError {
    RpcError::new("failed", msg)
}

/// `s`, if it is an absolute path with no NUL (and, `strict`, no `..`).
fn absolute<'a>(what: &str, s: &'a str, strict: bool) -> Result<&'a Path, RpcError> {
    if !s.starts_with('/') || s.contains('\0') {
        return Err(bad(format!("{what} {} is not an absolute path", quote(s))));
    }
    let p = Path::new(s);
    if strict && p.components().any(|c| c == Component::ParentDir) {
        return Err(bad(format!("{what} {} holds a `..`", quote(s))));
    }
    Ok(p)
}

/// A checked `mount` request: what to do, with nothing done yet.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    root: PathBuf,
    target: PathBuf,
    /// The file system type given to mount(2) (empty for a bind).
    fstype: String,
    flags: libc::c_ulong,
    data: String,
    /// A bind's flags, set by a remount after the bind (which ignores them).
    remount: libc::c_ulong,
    propagation: Vec<libc::c_ulong>,
    create: Create,
}

/// Checks `m` and makes its plan, changing nothing.
fn plan(m: &Mount) -> Result<Plan, RpcError> {
    let target = absolute("target", &m.target, true)?;
    let root = match &m.root {
        Some(r) => absolute("root", r, false)?,
        None => Path::new("/"),
    };
    if m.source.contains('\0') {
        return Err(bad("source holds a NUL byte"));
    }
    if m.options.iter().any(|o| o.contains('\0')) {
        return Err(bad("options hold a NUL byte"));
    }
    if !FSTYPES.contains(&m.fstype.as_str()) {
        return Err(bad(format!(
            "file system type {} is not one of {}",
            quote(&m.fstype),
            FSTYPES.join(", ")
        )));
    }
    let o = mounts::parse_options(m.options.iter().map(String::as_str));
    let bind = m.fstype == "bind" || o.flags & libc::MS_BIND != 0;
    if bind && !matches!(m.fstype.as_str(), "bind" | "none") {
        return Err(bad(format!(
            "bind or rbind with file system type {}: a bind's type is bind or none",
            quote(&m.fstype)
        )));
    }
    if m.fstype == "none" && !bind {
        return Err(bad("file system type none is for binds: add bind or rbind"));
    }
    let mut p = Plan {
        root: root.into(),
        target: target.into(),
        fstype: m.fstype.clone(),
        flags: o.flags,
        data: o.data,
        remount: 0,
        propagation: o.propagation,
        create: if m.mkdir {
            Create::Dirs
        } else {
            Create::Nothing
        },
    };
    if bind {
        let source = absolute("bind source", &m.source, false)?;
        if !p.data.is_empty() {
            return Err(bad(format!(
                "{}: a bind takes no file system options",
                quote(&p.data)
            )));
        }
        let meta = std::fs::metadata(source).map_err(|e| {
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => "not_found",
                _ => "failed",
            };
            RpcError::new(code, format!("bind source {}: {e}", quote(&m.source)))
        })?;
        if m.mkdir && !meta.is_dir() {
            p.create = Create::File;
        }
        p.fstype = String::new();
        p.remount = o.flags & !(libc::MS_BIND | libc::MS_REC);
        p.flags = libc::MS_BIND | (o.flags & libc::MS_REC);
    }
    Ok(p)
}

/// `mount`.
pub fn mount(m: Mount) -> Result<Value, RpcError> {
    let p = plan(&m)?;
    let what = || {
        format!(
            "mounting {} on {} ({})",
            quote(&m.source),
            quote(&m.target),
            m.fstype
        )
    };
    let root =
        mounts::open_dir(&p.root).map_err(|e| failed(format!("root {}: {e}", p.root.display())))?;
    let at = mounts::open_in(root.as_fd(), &p.target, p.create)
        .map_err(|e| failed(format!("target {}: {e}", quote(&m.target))))?;
    mounts::mount(
        &m.source,
        &mounts::fd_path(&at),
        &p.fstype,
        p.flags,
        &p.data,
    )
    .map_err(|e| failed(format!("{}: {e}", what())))?;
    drop(at);
    // Looked up again, the target is now the new mount's root: what the remount and the
    // propagation apply to. If they fail, the mount is taken away again.
    let top = mounts::open_in(root.as_fd(), &p.target, Create::Nothing)
        .map_err(|e| failed(format!("{}: finding it again: {e}", what())))?;
    let here = mounts::fd_path(&top);
    let finish = || -> std::io::Result<PathBuf> {
        if p.remount != 0 {
            mounts::mount(
                "",
                &here,
                "",
                libc::MS_REMOUNT | libc::MS_BIND | p.remount,
                "",
            )?;
        }
        for &f in &p.propagation {
            mounts::mount("", &here, "", f, "")?;
        }
        std::fs::read_link(&here)
    };
    match finish() {
        Ok(path) => Ok(json!({ "target": path.to_string_lossy() })),
        Err(e) => {
            let _ = mounts::umount(&here, libc::MNT_DETACH);
            Err(failed(format!(
                "{}: setting its flags or propagation: {e} (unmounted again)",
                what()
            )))
        }
    }
}

fn nothing_at(target: &str) -> RpcError {
    RpcError::new(
        "not_found",
        format!("nothing is mounted at {}", quote(target)),
    )
}

/// `unmount`.
pub fn unmount(u: Unmount, roots: &Roots) -> Result<Value, RpcError> {
    let target = absolute("target", &u.target, false)?;
    let detach = if u.detach { libc::MNT_DETACH } else { 0 };
    let unmounting =
        |p: &Path, e| failed(format!("unmounting {}: {e}", quote(&p.to_string_lossy())));
    if !u.recursive {
        return match mounts::umount(target, detach) {
            Ok(()) => Ok(json!({})),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {
                Err(nothing_at(&u.target))
            }
            Err(e) => Err(unmounting(target, e)),
        };
    }
    let here = match std::fs::canonicalize(target) {
        Ok(h) => h,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
            return Err(nothing_at(&u.target))
        }
        Err(e) => return Err(failed(format!("{}: {e}", quote(&u.target)))),
    };
    let listed = || {
        std::fs::read_to_string(&roots.mountinfo)
            .map(|t| mounts::under(&t, &here))
            .map_err(|e| failed(format!("{}: {e}", roots.mountinfo.display())))
    };
    let mut left = listed()?;
    if left.is_empty() {
        return Err(nothing_at(&u.target));
    }
    // A mount hidden under another one comes out on a later pass, once that one is gone.
    let mut error = None;
    for _ in 0..4 {
        // Why the last pass left some.
        error = None;
        let mut progress = false;
        for p in &left {
            match mounts::umount(p, detach | libc::UMOUNT_NOFOLLOW) {
                Ok(()) => progress = true,
                Err(e) => error = Some(unmounting(p, e)),
            }
        }
        left = listed()?;
        if left.is_empty() {
            return Ok(json!({}));
        }
        if !progress {
            break;
        }
    }
    let e = error.unwrap_or_else(|| failed("mounts came back"));
    Err(failed(format!(
        "{} (mounts left at or below {}: {})",
        e.message,
        quote(&u.target),
        left.len()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(source: &str, target: &str, fstype: &str, options: &[&str]) -> Mount {
        Mount {
            source: source.into(),
            target: target.into(),
            fstype: fstype.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            mkdir: true,
            root: None,
        }
    }

    #[test]
    fn requests_are_checked_and_planned() {
        use libc::*;
        let p = plan(&m(
            "tmpfs",
            "/r/dev",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ))
        .unwrap();
        assert_eq!(
            p,
            Plan {
                root: "/".into(),
                target: "/r/dev".into(),
                fstype: "tmpfs".into(),
                flags: MS_NOSUID | MS_STRICTATIME,
                data: "mode=755,size=65536k".into(),
                remount: 0,
                propagation: vec![],
                create: Create::Dirs,
            }
        );
        // A read-only bind: the bind, then a remount with its flags.
        let tmp = std::env::temp_dir();
        let tmp = tmp.to_str().unwrap();
        let p = plan(&m(
            tmp,
            "/r/data",
            "none",
            &["rbind", "ro", "nosuid", "rprivate"],
        ))
        .unwrap();
        assert_eq!(p.fstype, "");
        assert_eq!(p.flags, MS_BIND | MS_REC);
        assert_eq!(p.remount, MS_RDONLY | MS_NOSUID);
        assert_eq!(p.propagation, [MS_REC | MS_PRIVATE]);
        assert_eq!(p.create, Create::Dirs);
        let p = plan(&m("/proc/self/status", "/r/f", "bind", &[])).unwrap();
        assert_eq!((p.flags, p.remount, p.create), (MS_BIND, 0, Create::File));
        let mut n = m("proc", "/proc", "proc", &["nosuid"]);
        n.mkdir = false;
        n.root = Some("/r".into());
        let p = plan(&n).unwrap();
        assert_eq!((p.root.to_str(), p.create), (Some("/r"), Create::Nothing));

        for (r, why) in [
            (m("x", "/a", "ext4", &[]), "not one of"),
            (m("x", "/a", "", &[]), "not one of"),
            (m("proc", "a", "proc", &[]), "absolute"),
            (m("proc", "/a/../b", "proc", &[]), "`..`"),
            (m("proc", "/a/\0", "proc", &[]), "absolute"),
            (m("pr\0c", "/a", "proc", &[]), "NUL"),
            (m("proc", "/a", "proc", &["nosuid\0"]), "NUL"),
            (m("/x", "/a", "none", &["ro"]), "for binds"),
            (m("/x", "/a", "proc", &["rbind"]), "bind or none"),
            (m("rel", "/a", "bind", &[]), "absolute"),
            (
                m(tmp, "/a", "bind", &["mode=755"]),
                "no file system options",
            ),
        ] {
            let e = plan(&r).unwrap_err();
            assert_eq!(e.code, "bad_params", "{r:?}: {e}");
            assert!(e.message.contains(why), "{r:?}: {e}");
        }
        let e = plan(&m("/no/such/dir", "/a", "bind", &[])).unwrap_err();
        assert_eq!(e.code, "not_found", "{e}");
        let mut r = m("proc", "/proc", "proc", &[]);
        r.root = Some("rel".into());
        assert_eq!(plan(&r).unwrap_err().code, "bad_params");
        assert_eq!(
            unmount(
                Unmount {
                    target: "relative".into(),
                    recursive: true,
                    detach: false
                },
                &Roots::default()
            )
            .unwrap_err()
            .code,
            "bad_params"
        );
    }

    #[test]
    fn targets_are_made_inside_the_root() {
        let d = std::env::temp_dir().join(format!("torii-agent-in-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("root/run")).unwrap();
        std::fs::create_dir_all(d.join("root/outside")).unwrap();
        std::fs::create_dir_all(d.join("outside")).unwrap();
        let root = std::fs::canonicalize(d.join("root")).unwrap();
        // An absolute symlink, and one that climbs: both stay inside the root.
        std::os::unix::fs::symlink("/run", root.join("var-run")).unwrap();
        std::os::unix::fs::symlink("../../../../outside", root.join("up")).unwrap();
        std::os::unix::fs::symlink("/nowhere/file", root.join("dangling")).unwrap();
        let r = mounts::open_dir(&root).unwrap();
        let open = |p: &str, c| {
            mounts::open_in(r.as_fd(), Path::new(p), c)
                .map(|fd| std::fs::read_link(mounts::fd_path(&fd)).unwrap())
        };
        let a = open("/var-run/secrets/token", Create::Dirs);
        let b = open("/up/x", Create::File);
        let c = open("/dangling", Create::File);
        let missing = open("/not/there", Create::Nothing);
        let itself = open("/", Create::Nothing);
        let outside_clean = std::fs::read_dir(d.join("outside")).unwrap().count() == 0;
        let nowhere = Path::new("/nowhere").exists();
        let _ = std::fs::remove_dir_all(&d);
        assert_eq!(a.unwrap(), root.join("run/secrets/token"));
        assert_eq!(b.unwrap(), root.join("outside/x"));
        assert!(c.is_err());
        assert_eq!(missing.unwrap_err().raw_os_error(), Some(libc::ENOENT));
        assert_eq!(itself.unwrap(), root);
        assert!(outside_clean && !nowhere);
    }
}
