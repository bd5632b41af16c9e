//! The image builder on the kernel scripts/setup unpacked: reproducible bytes, the agent as
//! /init, the modules and their order, and refusals of what cannot boot.

use std::path::{Path, PathBuf};
use std::process::Command;

use torii_runtime::image::{self, ImageConfig};

fn kernel_root() -> PathBuf {
    let guest = std::env::var_os("TORII_GUEST_DIR")
        .map_or_else(|| PathBuf::from("/var/cache/torii/guest"), PathBuf::from);
    let root = guest.join("kroot");
    assert!(
        root.join("boot").is_dir(),
        "no unpacked kernel in {}: run scripts/setup",
        root.display()
    );
    root
}

fn config(out: &Path, agent: &Path) -> ImageConfig {
    ImageConfig {
        out: out.to_path_buf(),
        kernel_root: Some(kernel_root()),
        agent: agent.to_path_buf(),
        busybox: "/bin/busybox".into(),
        modules: image::MODULES.iter().map(|m| m.to_string()).collect(),
    }
}

/// The names in a newc archive (gzip'd), in order.
fn listing(initramfs: &Path) -> Vec<String> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc {} | cpio -it --quiet",
            initramfs.display()
        ))
        .output()
        .expect("cpio (scripts/setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_image_is_reproducible_and_boots_the_agent_as_init() {
    let tmp = torii_perf::proc_util::unique_tmp_dir("torii-image").unwrap();
    // Any static binary stands in for the agent here (busybox-static); booting is pod_vm's.
    let agent = Path::new("/bin/busybox");
    let a = image::build(&config(&tmp.join("a"), agent)).expect("build a");
    let b = image::build(&config(&tmp.join("b"), agent)).expect("build b");
    assert_eq!(a.initramfs_sha256, b.initramfs_sha256);
    let bytes = |d: &str| std::fs::read(tmp.join(d).join("initramfs.cpio.gz")).unwrap();
    assert_eq!(bytes("a"), bytes("b"));
    assert_eq!(
        std::fs::read(tmp.join("a/vmlinuz")).unwrap(),
        std::fs::read(kernel_root().join(format!("boot/vmlinuz-{}", a.kernel_version))).unwrap()
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.join("a/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["initramfs_sha256"], a.initramfs_sha256.as_str());

    // No time anywhere: gzip's MTIME is zero, and so is every cpio entry's mtime (bytes
    // 46..54 of each 110-byte newc header), owner and group.
    let gz = bytes("a");
    assert_eq!(&gz[4..8], &[0, 0, 0, 0], "gzip MTIME");
    let out = Command::new("gzip")
        .arg("-dc")
        .arg(tmp.join("a/initramfs.cpio.gz"))
        .output()
        .unwrap();
    let mut off = 0;
    let raw = out.stdout;
    let field = |h: &[u8], i: usize| {
        u32::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
            as usize
    };
    let mut entries = 0;
    loop {
        let h = &raw[off..off + 110];
        assert_eq!(&h[..6], b"070701");
        assert_eq!(
            (field(h, 2), field(h, 3), field(h, 5)),
            (0, 0, 0),
            "uid, gid, mtime of entry {entries}"
        );
        let (size, namesize) = (field(h, 6), field(h, 11));
        let name = &raw[off + 110..off + 110 + namesize - 1];
        entries += 1;
        if name == b"TRAILER!!!" {
            break;
        }
        off = (off + 110 + namesize).div_ceil(4) * 4;
        off = (off + size).div_ceil(4) * 4;
    }
    assert!(entries > 100, "{entries} entries");

    let names = listing(&tmp.join("a/initramfs.cpio.gz"));
    for want in [
        "init",
        "dev/console",
        "bin/busybox",
        "bin/sh",
        "sbin/ip",
        "lib/modules/torii.order",
        "lib/modules/virtio_net.ko",
        "lib/modules/ext4.ko",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    // Dependencies load first.
    let pos = |m: &str| {
        a.modules
            .iter()
            .position(|x| x == m)
            .unwrap_or_else(|| panic!("{m}"))
    };
    assert!(pos("jbd2") < pos("ext4"));
    assert!(pos("net_failover") < pos("virtio_net"));
    assert!(pos("vsock") < pos("vmw_vsock_virtio_transport"));
}

#[test]
fn what_cannot_boot_is_refused() {
    let tmp = torii_perf::proc_util::unique_tmp_dir("torii-image-bad").unwrap();
    // A dynamically linked agent has no libc in the initramfs.
    let e = image::build(&config(&tmp.join("x"), Path::new("/bin/ls")))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dynamically linked") && e.contains("crt-static"),
        "{e}"
    );
    let e = image::build(&config(&tmp.join("x"), Path::new("/etc/hostname")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ELF"), "{e}");
    let mut c = config(&tmp.join("x"), Path::new("/bin/busybox"));
    c.modules.push("no_such_module".into());
    let e = image::build(&c).unwrap_err().to_string();
    assert!(e.contains("no_such_module"), "{e}");
    assert!(
        !tmp.join("x/initramfs.cpio.gz").exists(),
        "nothing written on failure"
    );
}
