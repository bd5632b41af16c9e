//! What the agent does as PID 1 of the guest's initramfs: the kernel file systems first, the
//! power off last.

use std::ffi::CString;
use std::io;

fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (src, tgt, fs) = (c(src), c(target), c(fstype));
    // SAFETY: mount(2) with NUL-terminated strings that live across the call and no data.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        // Mounted already (by the kernel, or a previous stage): fine.
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(io::Error::new(e.kind(), format!("mount {target}: {e}")));
        }
    }
    Ok(())
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
}
