//! Shared pieces of the vhost-user-blk end-to-end tests: the backend under test, run as the
//! real `torii-vhost-user-blk` binary, and guest helpers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use torii_perf::guest::Guest;
use torii_perf::proc_util::{wait_until, ChildGuard};

pub use torii_perf::OrFail;

/// A `torii-vhost-user-blk` process serving `image` on `socket`.
pub struct Backend {
    child: Option<ChildGuard>,
    pub socket: PathBuf,
    image: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl Backend {
    /// Starts the backend with extra command-line `args` and waits for its socket.
    pub fn start(dir: &Path, image: &Path, args: &[&str]) -> Backend {
        let mut b = Backend {
            child: None,
            socket: dir.join("blk.sock"),
            image: image.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            log: dir.join("blk.log"),
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .or_fail("backend log");
        let child = Command::new(env!("CARGO_BIN_EXE_torii-vhost-user-blk"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("--file")
            .arg(&self.image)
            .args(&self.args)
            .env("TORII_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().or_fail("log"))
            .stderr(log)
            .spawn()
            .or_fail("spawning torii-vhost-user-blk");
        self.child = Some(ChildGuard::new(child, "torii-vhost-user-blk"));
        let up = wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
            self.socket.exists()
        });
        assert!(up, "backend did not listen; log:\n{}", self.log_text());
    }

    /// SIGKILL, then `between()` (the process may only finish dying in it), wait for the old
    /// process to be gone, and start a new one with the same arguments.
    pub fn kill_then(&mut self, between: impl FnOnce()) {
        if let Some(mut c) = self.child.take() {
            c.signal(libc::SIGKILL).or_fail("SIGKILL");
            between();
            c.wait_timeout(Duration::from_secs(30))
                .or_fail("reaping the killed backend")
                .expect("the killed backend did not exit");
        }
        self.spawn();
    }

    /// SIGTERM and wait: the backend must stop cleanly and remove its socket.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.signal(libc::SIGTERM).or_fail("SIGTERM");
            let st = c
                .wait_timeout(Duration::from_secs(10))
                .or_fail("waiting for the backend")
                .unwrap_or_else(|| panic!("backend ignored SIGTERM; log:\n{}", self.log_text()));
            assert!(
                st.success(),
                "backend exited with {st}: {}",
                self.log_text()
            );
            assert!(!self.socket.exists(), "socket left behind");
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A sparse image file of `mib` MiB.
pub fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).or_fail("creating image");
    f.set_len(mib << 20).or_fail("sizing image");
    p
}

/// Blocks the file occupies on the host (512-byte units).
pub fn allocated_blocks(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).or_fail("stat image").blocks()
}

/// Runs a host binary in the guest through the host's root shared at /host (its dynamic
/// loader and libraries), e.g. `mkfs.ext4`.
pub fn host_cmd(cmd: &str) -> String {
    format!(
        "MKE2FS_CONFIG=/host/etc/mke2fs.conf /host/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path /host/usr/lib/x86_64-linux-gnu {cmd}"
    )
}

pub const T: Duration = Duration::from_secs(60);

/// Runs `cmd` in the guest; panics with the output if it fails.
pub fn run(g: &mut Guest, cmd: &str) -> String {
    g.run_ok(cmd, T).or_fail(cmd)
}

pub use torii_perf::proc_util::sh;

/// An ext4 file system on a loop device, mounted at `mnt`, that can be frozen (fsfreeze:
/// every write to it blocks until it is thawed). Unmounted and detached on drop.
pub struct FreezableFs {
    pub mnt: PathBuf,
    dev: String,
}

impl FreezableFs {
    pub fn new(dir: &Path, mib: u64) -> FreezableFs {
        let backing = image(dir, "fs.img", mib);
        let dev = sh(&format!("losetup --find --show {}", backing.display()))
            .trim()
            .to_string();
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).or_fail("mount point");
        let fs = FreezableFs { mnt, dev };
        sh(&format!("mkfs.ext4 -q -F {}", fs.dev));
        sh(&format!("mount -t ext4 {} {}", fs.dev, fs.mnt.display()));
        fs
    }

    pub fn freeze(&self) {
        sh(&format!("fsfreeze --freeze {}", self.mnt.display()));
    }

    pub fn thaw(&self) {
        sh(&format!("fsfreeze --unfreeze {}", self.mnt.display()));
    }
}

impl Drop for FreezableFs {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .args(["--unfreeze"])
            .arg(&self.mnt)
            .output();
        let _ = Command::new("umount").arg(&self.mnt).output();
        let _ = Command::new("losetup").args(["-d", &self.dev]).output();
    }
}
