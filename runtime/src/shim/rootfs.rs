//! A container's root file system on its way into the guest: containerd's snapshot mounted on
//! the host, copied into an ext4 image (`mkfs.ext4 -d`), and the image served to the VM by a
//! vhost-user-blk backend process of its own.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use containerd_shim_protos::types::mount::Mount;

use crate::vmm::{find_binary, VmmProcess};

/// Mounts containerd's rootfs mounts (an overlay or a bind, from the snapshotter) at `target`.
/// Nothing to mount (a rootfs folder given as is) is fine.
pub fn mount(mounts: &[Mount], target: &Path) -> Result<bool, String> {
    match mounts {
        [] => Ok(false),
        [m] => {
            std::fs::create_dir_all(target).map_err(|e| format!("{}: {e}", target.display()))?;
            mount_one(m, target).map_err(|e| {
                format!(
                    "mounting the rootfs ({}) at {}: {e}",
                    m.type_,
                    target.display()
                )
            })?;
            Ok(true)
        }
        _ => Err(format!(
            "{} rootfs mounts: Torii takes one (an overlay or a bind)",
            mounts.len()
        )),
    }
}

/// Flags of containerd's mount options; the others are the file system's data.
fn mount_flag(o: &str) -> Option<(libc::c_ulong, bool)> {
    Some(match o {
        "ro" => (libc::MS_RDONLY, true),
        "rw" => (libc::MS_RDONLY, false),
        "nosuid" => (libc::MS_NOSUID, true),
        "nodev" => (libc::MS_NODEV, true),
        "noexec" => (libc::MS_NOEXEC, true),
        "noatime" => (libc::MS_NOATIME, true),
        "relatime" => (libc::MS_RELATIME, true),
        "bind" => (libc::MS_BIND, true),
        "rbind" => (libc::MS_BIND | libc::MS_REC, true),
        _ => return None,
    })
}

/// mount(2) of one containerd mount (an overlay's layers, or a bind of a folder). Done here
/// rather than by the containerd-shim crate, whose helper forks and waits through a reaper
/// this shim does not run.
fn mount_one(m: &Mount, target: &Path) -> Result<(), String> {
    use std::ffi::CString;
    let mut flags: libc::c_ulong = 0;
    let mut data = Vec::new();
    for o in &m.options {
        match mount_flag(o) {
            Some((f, true)) => flags |= f,
            Some((f, false)) => flags &= !f,
            None => data.push(o.as_str()),
        }
    }
    let data = data.join(",");
    // The kernel takes one page of options; an overlay of very many layers needs more.
    if data.len() >= 4096 {
        return Err(format!(
            "{} bytes of mount options (at most 4095)",
            data.len()
        ));
    }
    let c = |s: &str| CString::new(s).map_err(|_| format!("NUL in {s:?}"));
    let source = c(if m.source.is_empty() {
        "none"
    } else {
        &m.source
    })?;
    let fstype = c(if m.type_.is_empty() || m.type_ == "bind" {
        "none"
    } else {
        &m.type_
    })?;
    let target_c = CString::new(target.as_os_str().as_bytes()).map_err(|_| "NUL in the target")?;
    let data_c = c(&data)?;
    let ro_bind = flags & libc::MS_BIND != 0 && flags & libc::MS_RDONLY != 0;
    let first = if ro_bind {
        flags & !libc::MS_RDONLY
    } else {
        flags
    };
    let data_p = if data.is_empty() {
        std::ptr::null()
    } else {
        data_c.as_ptr().cast()
    };
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            first,
            data_p,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if ro_bind {
        // A bind is read-only only through a remount.
        let remount = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
        let none = std::ptr::null();
        // SAFETY: as above, with no source, type or data.
        let r = unsafe { libc::mount(none, target_c.as_ptr(), none, remount, std::ptr::null()) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            let _ = unmount(target);
            return Err(format!("read-only remount: {e}"));
        }
    }
    Ok(())
}

/// Unmounts `target` (lazily when busy).
pub fn unmount(target: &Path) -> Result<(), String> {
    let c = std::ffi::CString::new(target.as_os_str().as_bytes())
        .map_err(|_| format!("{}: NUL in path", target.display()))?;
    // SAFETY: umount2(2) with a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()), // not mounted
        Some(libc::EBUSY) => {
            // SAFETY: as above.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{}: {}",
                    target.display(),
                    std::io::Error::last_os_error()
                ))
            }
        }
        _ => Err(format!("{}: {e}", target.display())),
    }
}

/// Bytes the files under `root` take, roughly as ext4 will store them (4 KiB blocks, one per
/// folder, link and special file), without crossing into other mounts.
pub fn tree_size(root: &Path) -> Result<u64, String> {
    let dev = std::fs::symlink_metadata(root)
        .map_err(|e| format!("{}: {e}", root.display()))?
        .dev();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for e in entries {
            let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
            let m = e
                .metadata()
                .map_err(|err| format!("{}: {err}", e.path().display()))?;
            total += m.len().div_ceil(4096).max(1) * 4096;
            if m.is_dir() && m.dev() == dev {
                stack.push(e.path());
            }
        }
    }
    Ok(total)
}

/// Makes `image`: an ext4 file system holding a copy of `root`, with `free_mib` to spare.
/// The file is sparse: only what is written takes room on the host.
pub fn build_image(root: &Path, image: &Path, free_mib: u64, label: &str) -> Result<u64, String> {
    let used = tree_size(root)?;
    // Metadata (inode tables, bitmaps) on top of the data; at least 64 MiB.
    let size = (used + used / 8 + (free_mib << 20))
        .max(64 << 20)
        .div_ceil(1 << 20)
        << 20;
    let f = std::fs::File::create(image).map_err(|e| format!("{}: {e}", image.display()))?;
    f.set_len(size)
        .map_err(|e| format!("{}: {e}", image.display()))?;
    drop(f);
    let mkfs = find_binary("mkfs.ext4")
        .or_else(|| Some(PathBuf::from("/sbin/mkfs.ext4")).filter(|p| p.exists()))
        .ok_or("mkfs.ext4 not found (install e2fsprogs)")?;
    // No journal: the image is the container's own writable layer and goes with it.
    let out = Command::new(mkfs)
        .args(["-q", "-F", "-O", "^has_journal", "-m", "0", "-L"])
        .arg(&label[..label.len().min(16)])
        .arg("-d")
        .arg(root)
        .arg(image)
        .output()
        .map_err(|e| format!("mkfs.ext4: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(image);
        return Err(format!(
            "mkfs.ext4 -d {}: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(size)
}

/// A vhost-user-blk backend process serving one image; stopped, and its socket and image
/// removed, when dropped.
pub struct Backend {
    process: VmmProcess,
    pub socket: PathBuf,
    pub image: PathBuf,
}

impl Backend {
    /// Starts `binary` on `image`, serving `socket`. Runs on the shim's launcher thread (the
    /// backend dies with the thread that started it).
    pub fn start(
        binary: &Path,
        poll_mode: &str,
        image: &Path,
        socket: &Path,
        name: &str,
    ) -> Result<Backend, String> {
        let bin = if binary.is_absolute() {
            binary.to_path_buf()
        } else {
            find_binary(&binary.to_string_lossy())
                .ok_or_else(|| format!("{} not found in PATH", binary.display()))?
        };
        let mut cmd = Command::new(bin);
        cmd.arg("--socket")
            .arg(socket)
            .arg("--file")
            .arg(image)
            .args(["--poll-mode", poll_mode, "--name", name, "--serial"])
            .arg(&name[..name.len().min(20)]);
        let log = socket.with_extension("log");
        let mut process = VmmProcess::spawn(cmd, &log, None).map_err(|e| e.to_string())?;
        process
            .wait_socket(socket, Duration::from_secs(10))
            .map_err(|e| format!("the rootfs backend: {e}"))?;
        Ok(Backend {
            process,
            socket: socket.to_path_buf(),
            image: image.to_path_buf(),
        })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.image);
        let _ = std::fs::remove_file(self.socket.with_extension("log"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tree_size_counts_blocks() {
        let d = std::env::temp_dir().join(format!("torii-tree-{}", std::process::id()));
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/b/f"), vec![1u8; 5000]).unwrap();
        std::fs::write(d.join("g"), b"").unwrap();
        // a, b: 4 KiB each; f: 8 KiB; g: 4 KiB
        assert_eq!(tree_size(&d).unwrap(), 20480);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
