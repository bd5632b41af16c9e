//! What the agent does as PID 1 of the guest's initramfs: the kernel file systems and modules
//! first, the power off last.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    match crate::mounts::mount(src, Path::new(target), fstype, flags, "") {
        // Mounted already (by the kernel, or a previous stage): fine.
        Err(e) if e.raw_os_error() != Some(libc::EBUSY) => {
            Err(io::Error::new(e.kind(), format!("mount {target}: {e}")))
        }
        _ => Ok(()),
    }
}

/// Mounts /proc, /sys, /dev, /dev/pts, /run and /tmp.
pub fn setup() -> io::Result<()> {
    let nodev = (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC) as libc::c_ulong;
    mount("proc", "/proc", "proc", nodev)?;
    mount("sysfs", "/sys", "sysfs", nodev)?;
    mount(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        libc::MS_NOSUID as libc::c_ulong,
    )?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        (libc::MS_NOSUID | libc::MS_NOEXEC) as libc::c_ulong,
    )?;
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        (libc::MS_NOSUID | libc::MS_NODEV) as libc::c_ulong,
    )?;
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        (libc::MS_NOSUID | libc::MS_NODEV) as libc::c_ulong,
    )?;
    Ok(())
}

/// Syncs and powers the VM off (PID 1 only; never returns on success).
pub fn power_off() -> io::Error {
    // SAFETY: sync(2) and reboot(2) take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    io::Error::last_os_error()
}

/// The kernel modules to load, in order: `<dir>/torii.order` lists them one a line, as paths
/// relative to `dir` (blank lines and `#` comments skipped). No list: none.
pub fn module_list(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let text = match std::fs::read_to_string(dir.join("torii.order")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(PathBuf::from)
        .collect())
}

/// Loads the modules [`module_list`] names with `load`, in order, going on past failures;
/// what failed, as messages.
pub fn load_modules(dir: &Path, mut load: impl FnMut(&File) -> io::Result<()>) -> Vec<String> {
    let list = match module_list(dir) {
        Ok(l) => l,
        Err(e) => return vec![format!("{}: {e}", dir.join("torii.order").display())],
    };
    let mut failed = Vec::new();
    for m in list {
        if !m.components().all(|c| matches!(c, Component::Normal(_))) {
            failed.push(format!(
                "{}: not a path under {}",
                m.display(),
                dir.display()
            ));
            continue;
        }
        let path = dir.join(&m);
        if let Err(e) = File::open(&path).and_then(|f| load(&f)) {
            failed.push(format!("{}: {e}", path.display()));
        }
    }
    failed
}

/// finit_module(2) with no parameters; a module loaded already is fine.
pub fn finit_module(f: &File) -> io::Result<()> {
    // SAFETY: finit_module(2) with an fd open across the call, a NUL-terminated (empty)
    // parameter string that is static, and no flags.
    let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), c"".as_ptr(), 0) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EEXIST) {
            return Err(e);
        }
    }
    Ok(())
}

/// The value of `key=` on the kernel command line.
pub fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cmdline_values() {
        let c = "console=ttyS0 torii.agent=serial:agent.0 quiet";
        assert_eq!(
            super::cmdline_value(c, "torii.agent").as_deref(),
            Some("serial:agent.0")
        );
        assert_eq!(super::cmdline_value(c, "torii"), None);
        assert_eq!(super::cmdline_value(c, "quiet"), None);
    }

    #[test]
    fn modules_are_loaded_in_order_past_failures() {
        let dir = std::env::temp_dir().join(format!("torii-agent-modules-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kernel/drivers")).unwrap();
        // No list: nothing to load, no failure.
        assert!(super::load_modules(&dir, |_| panic!("nothing to load")).is_empty());
        for m in ["a.ko", "b.ko", "c.ko"] {
            std::fs::write(dir.join("kernel/drivers").join(m), m).unwrap();
        }
        std::fs::write(
            dir.join("torii.order"),
            "# virtio first\nkernel/drivers/a.ko\n\n  kernel/drivers/missing.ko\n../etc/passwd\nkernel/drivers/b.ko\nkernel/drivers/c.ko\n",
        )
        .unwrap();
        let mut loaded = Vec::new();
        let failed = super::load_modules(&dir, |f| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut &*f, &mut s)?;
            loaded.push(s.clone());
            if s == "b.ko" {
                return Err(std::io::Error::from_raw_os_error(libc::ENOEXEC));
            }
            Ok(())
        });
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(loaded, ["a.ko", "b.ko", "c.ko"]);
        assert_eq!(failed.len(), 3, "{failed:?}");
        assert!(failed[0].contains("missing.ko"), "{failed:?}");
        assert!(failed[1].contains("../etc/passwd"), "{failed:?}");
        assert!(failed[2].contains("b.ko"), "{failed:?}");
    }
}
