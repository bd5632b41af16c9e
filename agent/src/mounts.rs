//! mount(2), umount(2), mount options, paths resolved inside a root, and reading
//! /proc/self/mountinfo: for PID 1's file systems, the host's disks, hugetlbfs and the mounts
//! in containers' roots.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
}

/// mount(2): `src` on `target` as `fstype`, with `flags` and the file system's `data`.
pub fn mount(
    src: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let (src, tgt, fs, data) = (
        cstr(src.as_bytes())?,
        cstr(target.as_os_str().as_bytes())?,
        cstr(fstype.as_bytes())?,
        cstr(data.as_bytes())?,
    );
    // SAFETY: mount(2) with NUL-terminated strings that live across the call; the data is a
    // NUL-terminated string too, as every file system that takes text options expects.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// umount2(2) with `flags` (`MNT_DETACH`, `UMOUNT_NOFOLLOW`, …).
pub fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let t = cstr(target.as_os_str().as_bytes())?;
    // SAFETY: umount2(2) with a NUL-terminated string that lives across the call.
    if unsafe { libc::umount2(t.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mount options parsed: mount(8)'s names, and the OCI runtime spec's (`bind`, `rbind`,
/// propagation).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// mount(2) flags; `bind` is `MS_BIND`, `rbind` `MS_BIND | MS_REC`.
    pub flags: libc::c_ulong,
    /// Propagation changes, in order (`MS_PRIVATE`, `MS_REC | MS_SLAVE`, …).
    pub propagation: Vec<libc::c_ulong>,
    /// The others, for the file system, comma-separated.
    pub data: String,
}

/// Parses `options`, each a comma-separated list (`"noatime,nodev"`) or one option; a later
/// option overrides an earlier one (`ro,rw` is read-write).
pub fn parse_options<'a>(options: impl IntoIterator<Item = &'a str>) -> Options {
    use libc::*;
    const ATIME: c_ulong = MS_NOATIME | MS_RELATIME | MS_STRICTATIME;
    let mut o = Options::default();
    let mut data = Vec::new();
    for opt in options
        .into_iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        let (set, clear) = match opt {
            "ro" => (MS_RDONLY, 0),
            "rw" => (0, MS_RDONLY),
            "nosuid" => (MS_NOSUID, 0),
            "suid" => (0, MS_NOSUID),
            "nodev" => (MS_NODEV, 0),
            "dev" => (0, MS_NODEV),
            "noexec" => (MS_NOEXEC, 0),
            "exec" => (0, MS_NOEXEC),
            "sync" => (MS_SYNCHRONOUS, 0),
            "async" => (0, MS_SYNCHRONOUS),
            "dirsync" => (MS_DIRSYNC, 0),
            "noatime" => (MS_NOATIME, ATIME),
            "atime" => (0, MS_NOATIME),
            "relatime" => (MS_RELATIME, ATIME),
            "norelatime" => (0, MS_RELATIME),
            "strictatime" => (MS_STRICTATIME, ATIME),
            "nostrictatime" => (0, MS_STRICTATIME),
            "nodiratime" => (MS_NODIRATIME, 0),
            "diratime" => (0, MS_NODIRATIME),
            "lazytime" => (MS_LAZYTIME, 0),
            "nolazytime" => (0, MS_LAZYTIME),
            "nosymfollow" => (MS_NOSYMFOLLOW, 0),
            "symfollow" => (0, MS_NOSYMFOLLOW),
            "bind" => (MS_BIND, 0),
            "rbind" => (MS_BIND | MS_REC, 0),
            "defaults" => (0, 0),
            _ => {
                let propagation = match opt {
                    "private" => Some(MS_PRIVATE),
                    "shared" => Some(MS_SHARED),
                    "slave" => Some(MS_SLAVE),
                    "unbindable" => Some(MS_UNBINDABLE),
                    _ => opt.strip_prefix('r').and_then(|p| match p {
                        "private" => Some(MS_REC | MS_PRIVATE),
                        "shared" => Some(MS_REC | MS_SHARED),
                        "slave" => Some(MS_REC | MS_SLAVE),
                        "unbindable" => Some(MS_REC | MS_UNBINDABLE),
                        _ => None,
                    }),
                };
                match propagation {
                    Some(p) => o.propagation.push(p),
                    None => data.push(opt),
                }
                continue;
            }
        };
        o.flags = (o.flags & !clear) | set;
    }
    o.data = data.join(",");
    o
}

/// The directory `path`, opened `O_PATH` (a root for [`open_in`]).
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(path)?;
    Ok(f.into())
}

/// The path through /proc that names what `fd` is open on (for mount(2) and umount2(2)).
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// openat2(2) of `path` (relative; empty: `root` itself) resolved as if `root` were `/`:
/// symlinks in it, absolute ones included, stay inside `root`; opened `O_PATH`.
fn open_beneath(root: BorrowedFd, path: &Path) -> io::Result<OwnedFd> {
    let p = path.as_os_str().as_bytes();
    let c = cstr(if p.is_empty() { b"." } else { p })?;
    // SAFETY: open_how is plain integers, for which all zeroes is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // EAGAIN: a rename or mount raced with the lookup; try again.
    for _ in 0..32 {
        // SAFETY: openat2(2) reads the NUL-terminated path and `how`, both alive across the
        // call, and returns a new descriptor or -1.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                root.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if r >= 0 {
            // SAFETY: `r` is a descriptor openat2 just opened, owned by nothing else.
            return Ok(unsafe { OwnedFd::from_raw_fd(r as libc::c_int) });
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) {
            return Err(e);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

/// What [`open_in`] makes of a path that is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    Nothing,
    /// The missing directories.
    Dirs,
    /// The missing directories, and the last component as an empty file.
    File,
}

/// `path` (absolute or relative, without `..`) resolved inside `root` as if `root` were `/`,
/// opened `O_PATH`; what is missing is made first as `create` says. Nothing is made outside
/// `root`, whatever symlinks `root` holds.
pub fn open_in(root: BorrowedFd, path: &Path, create: Create) -> io::Result<OwnedFd> {
    let mut parts = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => parts.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a `..` in the path",
                ))
            }
        }
    }
    let whole: PathBuf = parts.iter().collect();
    match open_beneath(root, &whole) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) && create != Create::Nothing => {}
        r => return r,
    }
    // Component by component: each resolved from `root` again, so that a symlink met on the
    // way stays inside it; a missing one made in the directory its parent resolved to.
    let mut at = open_beneath(root, Path::new(""))?;
    let mut prefix = PathBuf::new();
    for (i, name) in parts.iter().enumerate() {
        prefix.push(name);
        match open_beneath(root, &prefix) {
            Ok(fd) => {
                at = fd;
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let n = cstr(name.as_bytes())?;
        let r = if create == Create::File && i + 1 == parts.len() {
            // O_EXCL: never through a (dangling) symlink.
            // SAFETY: openat(2) with a NUL-terminated name that lives across the call; the
            // descriptor it returns is closed at once.
            unsafe {
                let fd = libc::openat(
                    at.as_raw_fd(),
                    n.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644 as libc::c_uint,
                );
                if fd >= 0 {
                    libc::close(fd);
                }
                fd
            }
        } else {
            // SAFETY: mkdirat(2) with a NUL-terminated name that lives across the call.
            unsafe { libc::mkdirat(at.as_raw_fd(), n.as_ptr(), 0o755) }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            // Made meanwhile, or a dangling symlink: the open below says which.
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        at = open_beneath(root, &prefix)?;
    }
    Ok(at)
}

/// A mount, as /proc/self/mountinfo lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mounted file system.
    pub dev: String,
    pub fstype: String,
}

/// mountinfo's escapes (`\040` for a space, …) undone.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (b[i], oct) {
            (b'\\', Some(c)) => {
                out.push(c);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// A mountinfo line's mount id, parent id and mount point.
fn entry(line: &str) -> Option<(u64, u64, PathBuf)> {
    let f: Vec<&str> = line.split(' ').collect();
    // id parent major:minor root mount-point options [optional…] - fstype source …
    f.iter().position(|x| *x == "-")?;
    Some((
        f.first()?.parse().ok()?,
        f.get(1)?.parse().ok()?,
        PathBuf::from(OsString::from_vec(unescape(f.get(4)?))),
    ))
}

/// The mount points at or below `target` (canonical), from mountinfo's text, in an order to
/// unmount them: each mount after those mounted on it, and of the mounts on one mount, the
/// later first (one that hides another, mounted over it, comes out before it). A mount point
/// with several mounts stacked on it is listed once for each.
pub fn under(mountinfo: &str, target: &Path) -> Vec<PathBuf> {
    let all: Vec<(u64, u64, PathBuf)> = mountinfo
        .lines()
        .filter_map(entry)
        .filter(|(_, _, p)| p.starts_with(target))
        .collect();
    let index: HashMap<u64, usize> = all.iter().enumerate().map(|(i, m)| (m.0, i)).collect();
    let mut children = vec![Vec::new(); all.len()];
    let mut tops = Vec::new();
    for (i, (_, parent, _)) in all.iter().enumerate() {
        match index.get(parent) {
            Some(&p) if p != i => children[p].push(i),
            _ => tops.push(i),
        }
    }
    // Post-order, the last pushed (the latest) first.
    let mut seen = vec![false; all.len()];
    let mut out = Vec::with_capacity(all.len());
    let mut stack: Vec<(usize, bool)> = tops.into_iter().map(|i| (i, false)).collect();
    loop {
        while let Some((i, done)) = stack.pop() {
            if done {
                out.push(all[i].2.clone());
            } else if !seen[i] {
                seen[i] = true;
                stack.push((i, true));
                stack.extend(children[i].iter().map(|&c| (c, false)));
            }
        }
        // Only in a table with a cycle of parents: the rest, latest first.
        match seen.iter().rposition(|s| !s) {
            Some(i) => stack.push((i, false)),
            None => return out,
        }
    }
}

/// What is mounted at `target` (the topmost mount there), from mountinfo's text.
pub fn mounted_at(mountinfo: &str, target: &Path) -> Option<Mount> {
    mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        // id parent major:minor root mount-point options [optional…] - fstype source …
        let sep = f.iter().position(|x| *x == "-")?;
        if unescape(f.get(4)?) != target.as_os_str().as_bytes() {
            return None;
        }
        Some(Mount {
            dev: f.get(2)?.to_string(),
            fstype: f.get(sep + 1)?.to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_read() {
        let t = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                 40 22 254:16 / /mnt/my\\040data rw,relatime shared:1 - ext4 /dev/vdb rw\n\
                 41 22 0:50 / /dev/hugepages rw - hugetlbfs hugetlbfs rw,pagesize=2M\n\
                 42 41 0:51 / /dev/hugepages rw - hugetlbfs hugetlbfs rw,pagesize=1024M\n\
                 garbage\n";
        assert_eq!(
            mounted_at(t, Path::new("/mnt/my data")),
            Some(Mount {
                dev: "254:16".into(),
                fstype: "ext4".into()
            })
        );
        assert_eq!(
            mounted_at(t, Path::new("/dev/hugepages")).unwrap().dev,
            "0:51"
        );
        assert_eq!(mounted_at(t, Path::new("/mnt")), None);
        assert_eq!(unescape("a\\134b\\0"), b"a\\b\\0");
    }

    #[test]
    fn mounts_below_a_target_come_out_deepest_and_latest_first() {
        // 30 is the root; 31 a rootfs with proc (32), dev (33) and dev/pts (34) on dev, then
        // another tmpfs stacked on dev (35) hiding dev/pts, and a mount with a space (36).
        let t = "30 1 8:1 / / rw - ext4 /dev/sda rw\n\
                 31 30 254:16 / /r rw - ext4 /dev/vdb rw\n\
                 32 31 0:5 / /r/proc rw - proc proc rw\n\
                 33 31 0:6 / /r/dev rw - tmpfs tmpfs rw\n\
                 34 33 0:7 / /r/dev/pts rw - devpts devpts rw\n\
                 35 33 0:8 / /r/dev rw - tmpfs tmpfs rw\n\
                 36 31 0:9 / /r/a\\040b rw - tmpfs tmpfs rw\n\
                 37 30 0:10 / /rx rw - tmpfs tmpfs rw\n\
                 garbage\n";
        let got = under(t, Path::new("/r"));
        let want = ["/r/a b", "/r/dev", "/r/dev/pts", "/r/dev", "/r/proc", "/r"];
        assert_eq!(got, want.map(PathBuf::from));
        assert_eq!(
            under(t, Path::new("/r/dev/pts")),
            [PathBuf::from("/r/dev/pts")]
        );
        assert!(under(t, Path::new("/nothing")).is_empty());
        // A cycle of parents (no kernel writes one) still lists each once.
        let c = "5 6 0:1 / /c rw - tmpfs t rw\n6 5 0:2 / /c/d rw - tmpfs t rw\n";
        assert_eq!(under(c, Path::new("/c")).len(), 2);
    }

    #[test]
    fn options_become_flags_propagation_and_data() {
        use libc::*;
        let o = parse_options(["noatime,data=ordered,nodev,,errors=remount-ro"]);
        assert_eq!(o.flags, MS_NOATIME | MS_NODEV);
        assert_eq!(o.data, "data=ordered,errors=remount-ro");
        assert!(o.propagation.is_empty());
        assert_eq!(parse_options(["ro,rw,defaults"]), Options::default());
        // OCI's: one option an entry.
        let o = parse_options([
            "nosuid",
            "strictatime",
            "mode=755",
            "size=65536k",
            "rbind",
            "rprivate",
            "ro",
            "slave",
        ]);
        assert_eq!(
            o.flags,
            MS_NOSUID | MS_STRICTATIME | MS_BIND | MS_REC | MS_RDONLY
        );
        assert_eq!(o.propagation, [MS_REC | MS_PRIVATE, MS_SLAVE]);
        assert_eq!(o.data, "mode=755,size=65536k");
        let o = parse_options([
            "newinstance",
            "ptmxmode=0666",
            "mode=0620",
            "gid=5",
            "noexec",
        ]);
        assert_eq!(o.flags, MS_NOEXEC);
        assert_eq!(o.data, "newinstance,ptmxmode=0666,mode=0620,gid=5");
        // The later wins; one atime mode at a time.
        assert_eq!(parse_options(["nodev,dev,suid"]).flags, 0);
        assert_eq!(parse_options(["noatime", "relatime"]).flags, MS_RELATIME);
        assert_eq!(parse_options(["bind"]).flags, MS_BIND);
        // Not ours: for the file system (which refuses what it does not know).
        assert_eq!(parse_options(["rfoo", "remount"]).data, "rfoo,remount");
    }
}
