//! A private containerd for end-to-end tests of `containerd-shim-torii-v2`.
//!
//! [`Containerd::start`] runs Debian's containerd 1.6 with everything of its own in a fresh
//! temporary folder `D`: configuration, root, state, the gRPC, ttrpc and debug sockets, its
//! `opt` folder, and the shim's configuration (`TORII_SHIM_CONFIG`, which containerd passes to
//! the shims it starts) whose `state_dir` is `D/shim`. containerd finds the shim in its `PATH`:
//! the shim's folder comes first. [`Containerd::ctr`] runs `ctr` against it in one namespace,
//! with a timeout. Dropping it stops containerd (SIGTERM, then SIGKILL) and kills whatever is
//! left of the pods (shims, QEMU, disk backends: any process whose command line names `D`),
//! detaches mounts under `D` and removes the socket files of shims it killed, reporting what it
//! had to clean up; [`Containerd::shutdown`] does the same and returns that report, for tests
//! that assert nothing was left. [`Containerd::leftovers`] tells what of the pods is there now.
//!
//! A missing prerequisite (root, containerd and ctr, QEMU, mkfs.ext4, tar, a static busybox,
//! the pod VM image, the workspace's binaries) fails the test with what to install or run.
//! `TORII_KEEP_TMP=1` keeps `D` (logs included) after the test.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use torii_perf::prereq;
use torii_perf::proc_util::{self, TmpDir};

use super::oci_image::{self, BusyboxImage};

/// The runtime name containerd maps to `containerd-shim-torii-v2` (`ctr run --runtime`).
pub const RUNTIME: &str = "io.containerd.torii.v2";
/// The containerd namespace every `ctr` command of the harness uses.
pub const NAMESPACE: &str = "torii-e2e";
/// The reference the busybox test image is imported as.
pub const BUSYBOX_IMAGE: &str = "docker.io/torii/busybox:e2e";
/// How long one `ctr` command may take by default (a VM boot under TCG is ~5 s).
pub const CTR_TIMEOUT: Duration = Duration::from_secs(90);

const SETUP_HINT: &str = "apt-get install containerd (scripts/setup installs it)";

/// The pod VM image built by scripts/image (or `TORII_IMAGE_DIR`), as runtime/tests/pod_vm.rs
/// finds it.
pub fn image_dir() -> PathBuf {
    let dir = std::env::var_os("TORII_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/torii-image"));
    assert!(
        dir.join("initramfs.cpio.gz").is_file() && dir.join("vmlinuz").is_file(),
        "no pod VM image in {}: build it with scripts/image (scripts/test does)",
        dir.display()
    );
    dir
}

/// The guest kernel's release, from the image's manifest (None if it has no manifest).
pub fn image_kernel_release() -> Option<String> {
    let text = std::fs::read_to_string(image_dir().join("manifest.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["kernel_version"].as_str().map(str::to_string)
}

/// Fails the test unless everything a shim test needs on the host is there.
fn require_prerequisites() {
    prereq::require_root().expect("prerequisite");
    for b in ["containerd", "ctr"] {
        prereq::require_binary(b, SETUP_HINT).expect("prerequisite");
    }
    prereq::require_qemu().expect("prerequisite");
    prereq::require_binary("mkfs.ext4", "apt-get install e2fsprogs (scripts/setup)")
        .expect("prerequisite");
    prereq::require_binary("tar", "apt-get install tar").expect("prerequisite");
    oci_image::host_busybox();
}

/// What a `ctr` command did.
#[derive(Debug)]
pub struct CtrOutput {
    pub args: Vec<String>,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CtrOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code (None: ended by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl fmt::Display for CtrOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ctr {:?}: {}\n--- stdout\n{}--- stderr\n{}",
            self.args, self.status, self.stdout, self.stderr
        )
    }
}

/// A process of the host, from `/proc`.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: i32,
    pub argv: Vec<String>,
}

impl Proc {
    /// The program's file name (`qemu-system-x86_64`, `containerd-shim-torii-v2`, …).
    pub fn program(&self) -> &str {
        let a0 = self.argv.first().map_or("", String::as_str);
        a0.rsplit('/').next().unwrap_or(a0)
    }

    /// Whether an argument names `path` or something under it.
    pub fn mentions(&self, path: &Path) -> bool {
        let p = path.display().to_string();
        let under = format!("{}/", p.trim_end_matches('/'));
        self.argv.iter().any(|a| a == &p || a.contains(&under))
    }
}

impl fmt::Display for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}: {}", self.pid, self.argv.join(" "))
    }
}

/// Every process of the host with a command line (kernel threads and zombies have none).
pub fn processes() -> Vec<Proc> {
    let mut all = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if cmdline.is_empty() {
            continue;
        }
        let argv = cmdline
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        all.push(Proc { pid, argv });
    }
    all
}

/// The paths of the listening (bound) unix sockets of the host's network namespace.
pub fn unix_socket_paths() -> Vec<String> {
    std::fs::read_to_string("/proc/net/unix")
        .expect("/proc/net/unix")
        .lines()
        .skip(1)
        // Num RefCount Protocol Flags Type St Inode [Path]
        .filter_map(|l| l.split_whitespace().nth(7).map(str::to_string))
        .collect()
}

/// The mount points of this process's mount namespace (`/proc/self/mountinfo`, field 5).
pub fn mount_points() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("/proc/self/mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(unescape_mountinfo))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|_| b[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What is left of the pods under a harness's folder.
#[derive(Debug, Default)]
pub struct Leftovers {
    /// Processes naming the folder (containerd itself aside): shims, QEMU, disk backends.
    pub processes: Vec<Proc>,
    /// Entries of the shim's `state_dir`.
    pub state_entries: Vec<PathBuf>,
    /// Mount points under the folder.
    pub mounts: Vec<String>,
    /// Listening unix sockets under the folder (containerd's own aside); from a shutdown, the
    /// socket files of shims that died without removing them.
    pub sockets: Vec<String>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
            && self.state_entries.is_empty()
            && self.mounts.is_empty()
            && self.sockets.is_empty()
    }
}

impl fmt::Display for Leftovers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.processes {
            writeln!(f, "process {p}")?;
        }
        for e in &self.state_entries {
            writeln!(f, "state_dir entry {}", e.display())?;
        }
        for m in &self.mounts {
            writeln!(f, "mount {m}")?;
        }
        for s in &self.sockets {
            writeln!(f, "listening socket {s}")?;
        }
        Ok(())
    }
}

/// A private containerd whose shims boot Torii pod VMs.
pub struct Containerd {
    dir: TmpDir,
    daemon: Option<Child>,
    shim_dir: PathBuf,
}

impl Containerd {
    /// Starts a containerd of the test's own (`tag` names its folder), `shim` being the
    /// `containerd-shim-torii-v2` binary to put in its `PATH`. The disk backend
    /// `torii-vhost-user-blk` is taken from the shim's folder (the workspace's target folder).
    pub fn start(tag: &str, shim: &Path) -> Containerd {
        require_prerequisites();
        let image = image_dir();
        let shim_dir = shim.parent().expect("the shim's folder").to_path_buf();
        let blk = shim_dir.join("torii-vhost-user-blk");
        assert!(
            blk.is_file(),
            "{} is missing: build the workspace first (cargo build --workspace; scripts/test does)",
            blk.display()
        );
        let dir = proc_util::unique_tmp_dir(&format!("torii-shimcd-{tag}")).expect("temp dir");
        let d = dir.path().display().to_string();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"
# CRI (when built in) would want CNI and a streaming server of its own: ctr needs neither.
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = "{d}/debug.sock"
  level = "debug"

# Where containerd keeps installed plugin binaries (default /opt/containerd): ours.
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
            ),
        )
        .unwrap();
        // The shim's configuration. The guests run under TCG, as every VM test of Torii does
        // (`[sandbox.vm]`: the base of every pod's sandbox spec).
        std::fs::write(
            dir.join("shim.toml"),
            format!(
                r#"kernel = "{}"
initramfs = "{}"
vcpus = 1
memory_mib = 512
blk_backend = "{}"
state_dir = "{d}/shim"

[sandbox.vm]
accel = "tcg"
"#,
                image.join("vmlinuz").display(),
                image.join("initramfs.cpio.gz").display(),
                blk.display(),
            ),
        )
        .unwrap();
        let path = std::env::join_paths(std::iter::once(shim_dir.clone()).chain(
            std::env::split_paths(
                &std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ),
        ))
        .expect("PATH");
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .env("TORII_SHIM_CONFIG", dir.join("shim.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // A killed test binary takes containerd with it. (Not its shims: they are daemons of
        // their own, and only a Drop that runs stops them and their VMs.)
        proc_util::die_with_parent(&mut cmd);
        let daemon = cmd.spawn().expect("starting containerd");
        let mut cd = Containerd {
            dir,
            daemon: Some(daemon),
            shim_dir,
        };
        cd.wait_ready();
        cd
    }

    /// Waits until containerd answers on its socket.
    fn wait_ready(&mut self) {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self
                .daemon
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("containerd exited ({st}) at start:\n{}", self.log_tail(30));
            }
            if self.socket().exists()
                && self
                    .ctr_timeout(&["version"], Duration::from_secs(5))
                    .success()
            {
                return;
            }
            assert!(
                Instant::now() < end,
                "containerd did not answer on {} within 20 s:\n{}",
                self.socket().display(),
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The harness's folder `D`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The shim's `state_dir` (`D/shim`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("shim")
    }

    /// The folder containerd runs the shim from.
    pub fn shim_dir(&self) -> &Path {
        &self.shim_dir
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// containerd's own sockets under `D`.
    fn own_sockets(&self) -> [PathBuf; 3] {
        [
            self.socket(),
            self.dir.join("containerd.sock.ttrpc"),
            self.dir.join("debug.sock"),
        ]
    }

    /// The last `n` lines of containerd's log (its shims log there too).
    pub fn log_tail(&self, n: usize) -> String {
        format!(
            "--- containerd log ({}):\n{}",
            self.dir.join("containerd.log").display(),
            proc_util::file_tail(self.dir.join("containerd.log"), n)
        )
    }

    /// A `ctr --address D/containerd.sock --namespace NAMESPACE ARGS` command, stdin closed.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.socket())
            .args(["--namespace", NAMESPACE])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// `ctr ARGS` within [`CTR_TIMEOUT`].
    pub fn ctr(&self, args: &[&str]) -> CtrOutput {
        self.ctr_timeout(args, CTR_TIMEOUT)
    }

    /// `ctr ARGS`; killed and a test failure if it takes longer than `timeout`.
    pub fn ctr_timeout(&self, args: &[&str], timeout: Duration) -> CtrOutput {
        let mut child = self
            .ctr_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running ctr (apt-get install containerd)");
        // Drained on threads of their own, so a talkative command cannot block on a full pipe.
        let drain = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut buf);
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let out = drain(child.stdout.take().map(|s| Box::new(s) as _));
        let err = drain(child.stderr.take().map(|s| Box::new(s) as _));
        let end = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = child.try_wait().expect("waiting for ctr") {
                break st;
            }
            if Instant::now() >= end {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ctr {args:?} did not end within {timeout:?}\n--- stdout\n{}--- stderr\n{}\n{}",
                    out.join().unwrap_or_default(),
                    err.join().unwrap_or_default(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        CtrOutput {
            args: args.iter().map(|s| s.to_string()).collect(),
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        }
    }

    /// `ctr ARGS`, which must succeed; its stdout.
    #[track_caller]
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(out.success(), "{out}\n{}", self.log_tail(40));
        out.stdout
    }

    /// Builds the busybox OCI image under `D/image` and imports it as [`BUSYBOX_IMAGE`];
    /// checks that containerd lists it by that name.
    #[track_caller]
    pub fn import_busybox(&self) -> BusyboxImage {
        let work = self.dir.join("image");
        std::fs::create_dir_all(&work).unwrap();
        let image = oci_image::build_busybox(&work, BUSYBOX_IMAGE);
        self.ctr_ok(&["image", "import", &image.tarball.display().to_string()]);
        let images = self.ctr_ok(&["image", "ls", "-q"]);
        assert!(
            images.lines().any(|l| l == image.name),
            "`ctr image import` did not name the image {} (index annotation \
             io.containerd.image.name); images: {images:?}",
            image.name
        );
        image
    }

    /// The task's status in `ctr task ls` (`CREATED`, `RUNNING`, `STOPPED`…); None: no task.
    pub fn task_status(&self, id: &str) -> Option<String> {
        self.ctr_ok(&["task", "ls"]).lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.get(2).copied().unwrap_or("").to_string())
        })
    }

    /// Polls `ctr task ls` until the task is `want`; a test failure after `timeout`.
    #[track_caller]
    pub fn wait_task_status(&self, id: &str, want: &str, timeout: Duration) {
        let mut last = None;
        let ok = proc_util::wait_until(timeout, Duration::from_millis(100), || {
            last = self.task_status(id);
            last.as_deref() == Some(want)
        });
        assert!(
            ok,
            "task {id} is {last:?}, not {want}, after {timeout:?}\n{}",
            self.log_tail(40)
        );
    }

    /// The ids of `ctr container ls -q`.
    pub fn containers(&self) -> Vec<String> {
        self.ctr_ok(&["container", "ls", "-q"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Processes naming `D` other than containerd itself: the shims (`-address
    /// D/containerd.sock`), their VMMs and disk backends (paths under the state_dir).
    pub fn processes(&self) -> Vec<Proc> {
        let me = std::process::id() as i32;
        let daemon = self.daemon.as_ref().map(|c| c.id() as i32);
        processes()
            .into_iter()
            .filter(|p| p.pid != me && Some(p.pid) != daemon && p.mentions(self.dir()))
            .collect()
    }

    /// [`Self::processes`] running `program` (its file name starts with it: `qemu-system`).
    pub fn processes_of(&self, program: &str) -> Vec<Proc> {
        self.processes()
            .into_iter()
            .filter(|p| p.program().starts_with(program))
            .collect()
    }

    /// The shims' ttrpc sockets, from the `address` files the shims write into the tasks'
    /// bundles (`D/state/io.containerd.runtime.v2.task/<namespace>/<id>/address`): they live
    /// outside `D` (`/run/containerd/s/<hash>`).
    pub fn shim_sockets(&self) -> Vec<PathBuf> {
        let bundles = self
            .dir
            .join("state/io.containerd.runtime.v2.task")
            .join(NAMESPACE);
        let mut found: Vec<PathBuf> = std::fs::read_dir(bundles)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read_to_string(e.path().join("address")).ok())
                    .map(|a| PathBuf::from(a.trim().trim_start_matches("unix://")))
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found.dedup();
        found
    }

    /// What is left of the pods now: processes, the state_dir's entries, mounts and
    /// listening sockets under `D`.
    pub fn leftovers(&self) -> Leftovers {
        let under = format!("{}/", self.dir().display());
        let own: Vec<String> = self
            .own_sockets()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let mut state_entries: Vec<PathBuf> = std::fs::read_dir(self.state_dir())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        state_entries.sort();
        Leftovers {
            processes: self.processes(),
            state_entries,
            mounts: mount_points()
                .into_iter()
                .filter(|m| m.starts_with(&under))
                .collect(),
            sockets: unix_socket_paths()
                .into_iter()
                .filter(|s| s.starts_with(&under) && !own.contains(s))
                .collect(),
        }
    }

    /// Waits up to `timeout` for nothing to be left (processes take a moment to go), then
    /// asserts it.
    #[track_caller]
    pub fn assert_clean(&self, timeout: Duration) {
        let clean = proc_util::wait_until(timeout, Duration::from_millis(100), || {
            self.leftovers().is_empty()
        });
        assert!(
            clean,
            "left behind {timeout:?} after the last container was deleted:\n{}\n{}",
            self.leftovers(),
            self.log_tail(40)
        );
    }

    /// Stops containerd and cleans up after the pods; returns what had to be cleaned up
    /// (processes killed, mounts detached, stale shim sockets removed), so a test can fail
    /// on it.
    pub fn shutdown(mut self) -> Leftovers {
        self.teardown()
    }

    fn teardown(&mut self) -> Leftovers {
        // 1. containerd: SIGTERM, up to 10 s, then SIGKILL. Its shims outlive it (by design).
        if let Some(mut daemon) = self.daemon.take() {
            // SAFETY: kill(2) on our own child, not yet reaped: its pid cannot be recycled.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(10);
            while matches!(daemon.try_wait(), Ok(None)) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(daemon.try_wait(), Ok(None)) {
                eprintln!("containerd ignored SIGTERM for 10 s: killed");
                let _ = daemon.kill();
                let _ = daemon.wait();
            }
        }
        // 2. Whatever of the pods still runs.
        let mut left = Leftovers {
            processes: self.processes(),
            ..Leftovers::default()
        };
        for p in &left.processes {
            // SAFETY: kill(2) has no memory-safety preconditions. The pid was just read from
            // /proc with a command line naming our private folder.
            unsafe { libc::kill(p.pid, libc::SIGKILL) };
        }
        let gone =
            proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(20), || {
                self.processes().is_empty()
            });
        if !gone {
            eprintln!(
                "still running after SIGKILL: {:?}",
                self.processes()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            );
        }
        // 3. Mounts under D, deepest first, so the folder can be removed.
        let under = format!("{}/", self.dir().display());
        let mut mounts: Vec<String> = mount_points()
            .into_iter()
            .filter(|m| m.starts_with(&under))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in &mounts {
            let c = std::ffi::CString::new(m.as_str()).unwrap();
            // SAFETY: a valid NUL-terminated path; MNT_DETACH only detaches the mount.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        left.mounts = mounts;
        // 4. The sockets of shims that did not get to remove theirs (outside D: their
        //    addresses are in the tasks' bundles).
        let listening = unix_socket_paths();
        for s in self.shim_sockets() {
            let name = s.display().to_string();
            if s.exists() && !listening.contains(&name) {
                let _ = std::fs::remove_file(&s);
                left.sockets.push(name);
            }
        }
        left
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.daemon.is_none() {
            return;
        }
        let left = self.teardown();
        if !left.is_empty() {
            eprintln!(
                "containerd harness {}: cleaned up after the test:\n{left}",
                self.dir().display()
            );
        }
    }
}
