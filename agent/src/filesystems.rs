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

/// `mount`, checked and planned, with nothing done yet: the paths absolute (no `..` in the
/// target), nothing holding a NUL, a type of [`FSTYPES`] with options that fit it. Made only
/// by its `TryFrom<Mount>`, in [`crate::server::Call::decode`]; a bind's source is looked at
/// by [`mount`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedMount {
    /// As given: for messages, and mount(2)'s source.
    source: String,
    /// As given, for messages.
    target_given: String,
    /// As given, for messages.
    fstype_given: String,
    root: PathBuf,
    target: PathBuf,
    /// The file system type given to mount(2) (empty for a bind).
    fstype: String,
    flags: libc::c_ulong,
    data: String,
    /// A bind's flags, set by a remount after the bind (which ignores them).
    remount: libc::c_ulong,
    propagation: Vec<libc::c_ulong>,
    bind: bool,
    mkdir: bool,
}

impl TryFrom<Mount> for CheckedMount {
    type Error = RpcError;

    fn try_from(m: Mount) -> Result<CheckedMount, RpcError> {
        let target = absolute("target", &m.target, true)?.to_path_buf();
        let root = match &m.root {
            Some(r) => absolute("root", r, false)?,
            None => Path::new("/"),
        }
        .to_path_buf();
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
        let mut c = CheckedMount {
            source: m.source,
            target_given: m.target,
            fstype_given: m.fstype.clone(),
            root,
            target,
            fstype: m.fstype,
            flags: o.flags,
            data: o.data,
            remount: 0,
            propagation: o.propagation,
            bind,
            mkdir: m.mkdir,
        };
        if bind {
            absolute("bind source", &c.source, false)?;
            if !c.data.is_empty() {
                return Err(bad(format!(
                    "{}: a bind takes no file system options",
                    quote(&c.data)
                )));
            }
            c.fstype = String::new();
            c.remount = o.flags & !(libc::MS_BIND | libc::MS_REC);
            c.flags = libc::MS_BIND | (o.flags & libc::MS_REC);
        }
        Ok(c)
    }
}

impl CheckedMount {
    /// What is mounted: no NUL; an absolute path for a bind.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The directory the target is taken in: absolute, no NUL (`/` if none was given).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where, inside [`CheckedMount::root`]: absolute, no NUL, no `..`.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The type given to mount(2): one of [`FSTYPES`] but `bind` and `none`, or empty for a
    /// bind.
    pub fn fstype(&self) -> &str {
        &self.fstype
    }

    /// mount(2)'s flags: `MS_BIND` (and `MS_REC`) alone for a bind.
    pub fn flags(&self) -> libc::c_ulong {
        self.flags
    }

    /// The options for the file system (none for a bind).
    pub fn data(&self) -> &str {
        &self.data
    }

    /// A bind's flags, set by a remount after the bind: never `MS_BIND` or `MS_REC`.
    pub fn remount(&self) -> libc::c_ulong {
        self.remount
    }

    /// Propagation changes, in order.
    pub fn propagation(&self) -> &[libc::c_ulong] {
        &self.propagation
    }

    pub fn bind(&self) -> bool {
        self.bind
    }

    pub fn mkdir(&self) -> bool {
        self.mkdir
    }

    /// What [`mounts::open_in`] is to make of a missing target: for a bind, whose source must
    /// be there, a file if the source is not a directory.
    fn create(&self) -> Result<Create, RpcError> {
        let dir = if self.bind {
            let meta = std::fs::metadata(&self.source).map_err(|e| {
                let code = match e.kind() {
                    std::io::ErrorKind::NotFound => "not_found",
                    _ => "failed",
                };
                RpcError::new(code, format!("bind source {}: {e}", quote(&self.source)))
            })?;
            meta.is_dir()
        } else {
            true
        };
        Ok(match (self.mkdir, dir) {
            (false, _) => Create::Nothing,
            (true, true) => Create::Dirs,
            (true, false) => Create::File,
        })
    }
}

/// `mount`.
pub fn mount(p: CheckedMount) -> Result<Value, RpcError> {
    let create = p.create()?;
    let what = || {
        format!(
            "mounting {} on {} ({})",
            quote(&p.source),
            quote(&p.target_given),
            p.fstype_given
        )
    };
    let root =
        mounts::open_dir(&p.root).map_err(|e| failed(format!("root {}: {e}", p.root.display())))?;
    let at = mounts::open_in(root.as_fd(), &p.target, create)
        .map_err(|e| failed(format!("target {}: {e}", quote(&p.target_given))))?;
    mounts::mount(
        &p.source,
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

/// `unmount`, checked: an absolute target with no NUL. Made only by its `TryFrom<Unmount>`,
/// in [`crate::server::Call::decode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedUnmount {
    target: String,
    recursive: bool,
    detach: bool,
}

impl TryFrom<Unmount> for CheckedUnmount {
    type Error = RpcError;

    fn try_from(u: Unmount) -> Result<CheckedUnmount, RpcError> {
        absolute("target", &u.target, false)?;
        Ok(CheckedUnmount {
            target: u.target,
            recursive: u.recursive,
            detach: u.detach,
        })
    }
}

impl CheckedUnmount {
    /// Absolute, no NUL (a `..` is the kernel's to resolve).
    pub fn target(&self) -> &Path {
        Path::new(&self.target)
    }

    pub fn recursive(&self) -> bool {
        self.recursive
    }

    pub fn detach(&self) -> bool {
        self.detach
    }
}

fn nothing_at(target: &str) -> RpcError {
    RpcError::new(
        "not_found",
        format!("nothing is mounted at {}", quote(target)),
    )
}

/// `unmount`.
pub fn unmount(u: CheckedUnmount, roots: &Roots) -> Result<Value, RpcError> {
    let target = u.target();
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

    /// `m` checked, and what its target would be made as.
    fn plan(m: Mount) -> Result<(CheckedMount, Create), RpcError> {
        let c = CheckedMount::try_from(m)?;
        let create = c.create()?;
        Ok((c, create))
    }

    #[test]
    fn requests_are_checked_and_planned() {
        use libc::*;
        let (p, create) = plan(m(
            "tmpfs",
            "/r/dev",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ))
        .unwrap();
        assert_eq!(
            (
                p.root(),
                p.target(),
                p.fstype(),
                p.flags(),
                p.data(),
                p.remount(),
                p.propagation(),
                create
            ),
            (
                Path::new("/"),
                Path::new("/r/dev"),
                "tmpfs",
                MS_NOSUID | MS_STRICTATIME,
                "mode=755,size=65536k",
                0,
                &[][..],
                Create::Dirs
            )
        );
        assert!(!p.bind());
        // A read-only bind: the bind, then a remount with its flags.
        let tmp = std::env::temp_dir();
        let tmp = tmp.to_str().unwrap();
        let (p, create) = plan(m(
            tmp,
            "/r/data",
            "none",
            &["rbind", "ro", "nosuid", "rprivate"],
        ))
        .unwrap();
        assert_eq!(p.fstype(), "");
        assert_eq!(p.flags(), MS_BIND | MS_REC);
        assert_eq!(p.remount(), MS_RDONLY | MS_NOSUID);
        assert_eq!(p.propagation(), [MS_REC | MS_PRIVATE]);
        assert_eq!(create, Create::Dirs);
        let (p, create) = plan(m("/proc/self/status", "/r/f", "bind", &[])).unwrap();
        assert_eq!((p.flags(), p.remount(), create), (MS_BIND, 0, Create::File));
        let mut n = m("proc", "/proc", "proc", &["nosuid"]);
        n.mkdir = false;
        n.root = Some("/r".into());
        let (p, create) = plan(n).unwrap();
        assert_eq!((p.root().to_str(), create), (Some("/r"), Create::Nothing));
        // A bind's source is looked at when the call runs: checked, it is still missing then.
        let c = CheckedMount::try_from(m("/no/such/dir", "/a", "bind", &[])).unwrap();
        assert_eq!(c.create().unwrap_err().code, "not_found");
        let e = super::mount(c).unwrap_err();
        assert_eq!(e.code, "not_found", "{e}");
        assert!(
            e.message.starts_with("bind source \"/no/such/dir\": "),
            "{e}"
        );
    }

    /// What `mount` and `unmount` refuse without looking at the system is refused by
    /// [`Call::decode`], with the words the calls used to answer with when run.
    #[test]
    fn decode_refuses_what_needs_no_system() {
        use crate::server::Call;
        let tmp = std::env::temp_dir();
        let tmp = tmp.to_str().unwrap();
        let mount = |source: &str, target: &str, fstype: &str, options: &[&str]| json!({"source": source, "target": target, "fstype": fstype, "options": options});
        let fstypes = "proc, sysfs, tmpfs, devpts, mqueue, cgroup2, bind, none";
        for (method, params, message) in [
            (
                "mount",
                mount("x", "/a", "ext4", &[]),
                format!("file system type \"ext4\" is not one of {fstypes}"),
            ),
            (
                "mount",
                mount("x", "/a", "", &[]),
                format!("file system type \"\" is not one of {fstypes}"),
            ),
            (
                "mount",
                json!({"source": "x", "target": "/a"}),
                "file system type none is for binds: add bind or rbind".into(),
            ),
            (
                "mount",
                mount("proc", "a", "proc", &[]),
                "target \"a\" is not an absolute path".into(),
            ),
            (
                "mount",
                mount("proc", "/a/../b", "proc", &[]),
                "target \"/a/../b\" holds a `..`".into(),
            ),
            (
                "mount",
                mount("proc", "/a/\0", "proc", &[]),
                "target \"/a/\\0\" is not an absolute path".into(),
            ),
            (
                "mount",
                mount("pr\0c", "/a", "proc", &[]),
                "source holds a NUL byte".into(),
            ),
            (
                "mount",
                mount("proc", "/a", "proc", &["nosuid\0"]),
                "options hold a NUL byte".into(),
            ),
            (
                "mount",
                mount("/x", "/a", "none", &["ro"]),
                "file system type none is for binds: add bind or rbind".into(),
            ),
            (
                "mount",
                mount("/x", "/a", "proc", &["rbind"]),
                "bind or rbind with file system type \"proc\": a bind's type is bind or none"
                    .into(),
            ),
            (
                "mount",
                mount("rel", "/a", "bind", &[]),
                "bind source \"rel\" is not an absolute path".into(),
            ),
            (
                "mount",
                mount(tmp, "/a", "bind", &["mode=755"]),
                "\"mode=755\": a bind takes no file system options".into(),
            ),
            (
                "mount",
                json!({"source": "proc", "target": "/proc", "fstype": "proc", "root": "rel"}),
                "root \"rel\" is not an absolute path".into(),
            ),
            (
                "unmount",
                json!({"target": "relative", "recursive": true}),
                "target \"relative\" is not an absolute path".into(),
            ),
            (
                "unmount",
                json!({"target": "/mnt/\0"}),
                "target \"/mnt/\\0\" is not an absolute path".into(),
            ),
        ] {
            let e = Call::decode(method, params.clone()).unwrap_err();
            assert_eq!(
                (e.code.as_str(), e.message.as_str()),
                ("bad_params", message.as_str()),
                "{method} {params}"
            );
        }
        // What is left for the run: whether the bind's source is there.
        for (method, params) in [
            ("mount", mount("/no/such/dir", "/a", "bind", &[])),
            ("mount", mount("proc", "/proc", "proc", &["nosuid"])),
            ("unmount", json!({"target": "/a/../b"})),
        ] {
            if let Err(e) = Call::decode(method, params.clone()) {
                panic!("{method} {params}: {e}");
            }
        }
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
