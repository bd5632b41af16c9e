//! torii-agent's `mount_block` and `unmount` against the real kernel: an ext4 image in a
//! temporary directory, on a loop device, mounted by its device path (read-write, again,
//! read-only), unmounted; errors for a missing disk, a wrong file system, nothing mounted.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::Host;
use serde_json::json;
use torii_agent::process::Processes;
use torii_agent::server::{Agent, Roots};

fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The image, its loop device and mount point, undone however the test ends.
struct Disk {
    dir: PathBuf,
    dev: Option<String>,
    target: PathBuf,
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.target).output();
        if let Some(d) = &self.dev {
            let _ = Command::new("losetup").args(["-d", d]).output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn mountinfo_line(target: &Path) -> Option<String> {
    let t = target.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(t))
        .map(str::to_string)
}

#[test]
fn a_disk_is_mounted_and_unmounted() {
    if run("losetup", &["--version"]).is_err() || run("mkfs.ext4", &["-V"]).is_err() {
        eprintln!("skipped: no losetup or mkfs.ext4");
        return;
    }
    let dir = std::env::temp_dir().join(format!("torii-agent-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dir = std::fs::canonicalize(dir).unwrap();
    let mut disk = Disk {
        target: dir.join("mnt/data"),
        dir: dir.clone(),
        dev: None,
    };
    let img = dir.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    run("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]).unwrap();
    let dev = run("losetup", &["--find", "--show", img.to_str().unwrap()]).unwrap();
    disk.dev = Some(dev.clone());
    let target = disk.target.to_str().unwrap().to_string();

    let agent = Arc::new(Agent {
        processes: Processes::new(false).unwrap(),
        init: false,
        roots: Roots {
            patience: Duration::from_millis(500),
            ..Roots::default()
        },
    });
    let mut h = Host::serving(agent, None);
    let m = h.call(
        "mount_block",
        json!({"source": {"path": dev}, "target": target, "options": "noatime,errors=remount-ro"}),
    );
    assert_eq!(m, json!({"device": dev, "target": target}));
    let line = mountinfo_line(&disk.target).expect("mounted");
    assert!(
        line.contains(" - ext4 ") && line.contains("noatime"),
        "{line}"
    );
    std::fs::write(disk.target.join("hello"), "hi").unwrap();
    // Asked again (a host that retries): the same answer, no second mount.
    let again = h.call(
        "mount_block",
        json!({"source": {"path": dev}, "target": target}),
    );
    assert_eq!(again, m);
    h.call("unmount", json!({"target": target}));
    assert_eq!(mountinfo_line(&disk.target), None);
    assert_eq!(
        h.call_err("unmount", json!({"target": target}))["code"],
        "not_found"
    );

    // Read-only: what was written is there, nothing more can be.
    h.call(
        "mount_block",
        json!({"source": {"path": dev}, "target": target, "fstype": "ext4", "read_only": true}),
    );
    assert_eq!(
        std::fs::read_to_string(disk.target.join("hello")).unwrap(),
        "hi"
    );
    let e = std::fs::write(disk.target.join("more"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS));
    h.call("unmount", json!({"target": target}));

    // Errors: a file system the disk does not hold, a disk that does not appear.
    let e = h.call_err(
        "mount_block",
        json!({"source": {"path": dev}, "target": target, "fstype": "vfat"}),
    );
    assert_eq!(e["code"], "failed", "{e}");
    assert!(e["message"].as_str().unwrap().contains("mounting"), "{e}");
    let e = h.call_err(
        "mount_block",
        json!({"source": {"path": dir.join("no-such-disk")}, "target": target}),
    );
    assert_eq!(e["code"], "not_found", "{e}");
    let e = h.call_err(
        "mount_block",
        json!({"source": {"serial": "no-such-serial"}, "target": target}),
    );
    assert_eq!(e["code"], "not_found", "{e}");
    assert_eq!(mountinfo_line(&disk.target), None);
}
