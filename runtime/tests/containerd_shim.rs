//! containerd-shim-torii-v2 under a real containerd (Debian's 1.6, started by each test with
//! its own configuration, root, state and sockets): a busybox OCI image built here and
//! imported, containers run in pod VMs (QEMU TCG, the image scripts/image builds), their
//! output, exit codes, execs, signals, states, sandboxes shared by two containers, the NFV
//! annotations, and nothing left behind afterwards. Needs root, containerd, QEMU 10 and the
//! image (scripts/setup, scripts/test).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use torii_perf::proc_util::{self, ChildGuard, TmpDir};

const RUNTIME: &str = "io.containerd.torii.v2";
const IMAGE: &str = "docker.io/torii/busybox:test";
const NAMESPACE: &str = "torii-test";

fn image_dir() -> PathBuf {
    torii_perf::prereq::pod_vm_image_dir().expect("prerequisite")
}

/// A binary of this workspace's build.
fn bin(name: &str) -> PathBuf {
    let b = Path::new(env!("CARGO_BIN_EXE_containerd-shim-torii-v2"))
        .parent()
        .map(|d| d.join(name))
        .expect("target directory");
    assert!(
        b.is_file(),
        "{} is missing: build it first (cargo build --workspace, or run scripts/test)",
        b.display()
    );
    b
}

/// A containerd of the test's own, its shims configured to boot Torii pod VMs.
struct Containerd {
    dir: TmpDir,
    daemon: ChildGuard,
}

impl Containerd {
    fn start(tag: &str) -> Containerd {
        torii_perf::prereq::require_root().expect("prerequisite");
        torii_perf::prereq::require_qemu().expect("prerequisite");
        for b in ["containerd", "ctr"] {
            torii_perf::prereq::require_binary(b, "apt-get install containerd (scripts/setup)")
                .expect("prerequisite");
        }
        let image = image_dir();
        let dir = proc_util::unique_tmp_dir(&format!("torii-cd-{tag}")).unwrap();
        let d = dir.path().display().to_string();
        std::fs::write(
            dir.join("config.toml"),
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/containerd.sock\"\n\
                 [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n\
                 [debug]\n  level = \"debug\"\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("shim.toml"),
            format!(
                "kernel = \"{}\"\ninitramfs = \"{}\"\nvcpus = 1\nmemory_mib = 384\n\
                 blk_backend = \"{}\"\nstate_dir = \"{d}/shim\"\n\
                 [sandbox.vm]\naccel = \"tcg\"\n",
                image.join("vmlinuz").display(),
                image.join("initramfs.cpio.gz").display(),
                bin("torii-vhost-user-blk").display(),
            ),
        )
        .unwrap();
        let shim_dir = bin("containerd-shim-torii-v2")
            .parent()
            .unwrap()
            .to_path_buf();
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .env("TORII_SHIM_CONFIG", dir.join("shim.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        proc_util::die_with_parent(&mut cmd);
        let daemon = ChildGuard::new(cmd.spawn().expect("containerd"), "containerd");
        proc_util::wait_for_path(dir.join("containerd.sock"), Duration::from_secs(20))
            .unwrap_or_else(|e| {
                panic!(
                    "containerd did not start: {e}\n{}",
                    proc_util::file_tail(dir.join("containerd.log"), 20)
                )
            });
        let cd = Containerd { dir, daemon };
        cd.import_busybox();
        cd
    }

    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(self.dir.join("containerd.sock"))
            .args(["--namespace", NAMESPACE])
            .args(args)
            .stdin(Stdio::null());
        c
    }

    /// `ctr ARGS`, within 120 s.
    fn ctr(&self, args: &[&str]) -> Output {
        let mut child = self
            .ctr_cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ctr");
        let end = Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > end {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "ctr {args:?} did not end within 120 s: {}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    /// `ctr ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn log_tail(&self) -> String {
        format!(
            "containerd log:\n{}",
            proc_util::file_tail(self.dir.join("containerd.log"), 30)
        )
    }

    /// The task's status in `ctr task ls` (None: no task).
    fn status(&self, id: &str) -> Option<String> {
        self.ok(&["task", "ls"]).lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id)).then(|| f.get(2).unwrap_or(&"").to_string())
        })
    }

    fn wait_status(&self, id: &str, want: &str) {
        let ok = proc_util::wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            self.status(id).as_deref() == Some(want)
        });
        assert!(ok, "{id} is {:?}, not {want}", self.status(id));
    }

    /// Builds a busybox OCI image layout (one layer: the host's static busybox and its applet
    /// links), packs it and imports it as [`IMAGE`].
    fn import_busybox(&self) {
        let rootfs = self.dir.join("busybox-rootfs");
        for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "run"] {
            std::fs::create_dir_all(rootfs.join(d)).unwrap();
        }
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .expect("busybox (apt-get install busybox-static: scripts/setup)");
        std::fs::copy(busybox, rootfs.join("bin/busybox")).unwrap();
        std::fs::set_permissions(
            rootfs.join("bin/busybox"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        for a in [
            "sh", "echo", "cat", "sleep", "nproc", "ls", "true", "false", "uname", "mount", "ps",
            "head", "grep", "wc", "kill", "id", "env", "pwd", "touch", "stat", "ip", "awk",
        ] {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(a)).unwrap();
        }
        let oci = self.dir.join("oci");
        let blobs = oci.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let layer = self.dir.join("layer.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .args([
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--sort=name",
                "-cf",
            ])
            .arg(&layer)
            .arg(".")
            .status()
            .expect("tar");
        assert!(st.success());
        let blob = |data: &[u8]| -> (String, usize) {
            let digest = format!("{:x}", Sha256::digest(data));
            std::fs::write(blobs.join(&digest), data).unwrap();
            (format!("sha256:{digest}"), data.len())
        };
        let (layer_digest, layer_size) = blob(&std::fs::read(&layer).unwrap());
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": ["PATH=/bin"], "Cmd": ["sh"] },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
        });
        let (config_digest, config_size) = blob(config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest, "size": config_size,
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest, "size": layer_size,
            }],
        });
        let (manifest_digest, manifest_size) = blob(manifest.to_string().as_bytes());
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest, "size": manifest_size,
                "platform": { "architecture": "amd64", "os": "linux" },
                "annotations": { "io.containerd.image.name": IMAGE },
            }],
        });
        std::fs::write(oci.join("index.json"), index.to_string()).unwrap();
        std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let tarball = self.dir.join("busybox-oci.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&oci)
            .arg("-cf")
            .arg(&tarball)
            .arg(".")
            .status()
            .expect("tar");
        assert!(st.success());
        self.ok(&["image", "import", &tarball.display().to_string()]);
        let images = self.ok(&["image", "ls", "-q"]);
        assert!(images.lines().any(|l| l == IMAGE), "imported: {images}");
    }

    /// The socket of the shim serving container `id` (containerd keeps it in the bundle).
    fn shim_socket(&self, id: &str) -> PathBuf {
        let bundle = self
            .dir
            .join("state/io.containerd.runtime.v2.task")
            .join(NAMESPACE)
            .join(id);
        let address = std::fs::read_to_string(bundle.join("address")).unwrap();
        PathBuf::from(address.trim().trim_start_matches("unix://"))
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("shim")
    }

    /// Processes of this test's pods still running: QEMU, the disk backends, the shims.
    fn leftovers(&self) -> Vec<String> {
        let mark = self.dir.path().display().to_string();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let ours = [
                "qemu-system",
                "torii-vhost-user-blk",
                "containerd-shim-torii-v2",
            ]
            .iter()
            .any(|p| cmd.split(' ').next().unwrap_or("").contains(p));
            // A shim's command line names containerd's socket; QEMU's and a backend's name
            // the shim's state folder.
            if ours && cmd.contains(&mark) {
                found.push(cmd);
            }
        }
        found
    }

    /// What of the pods is left: processes, the shim's folder's content, mounts and sockets
    /// under this test's folder (containerd's own aside).
    fn left(&self) -> Vec<String> {
        let mut left = self.leftovers();
        left.extend(
            std::fs::read_dir(self.state_dir())
                .map(|d| {
                    d.flatten()
                        .map(|e| e.path().display().to_string())
                        .collect()
                })
                .unwrap_or_else(|_| Vec::new()),
        );
        let mark = self.dir.path().display().to_string();
        left.extend(
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .filter(|l| l.contains(&mark))
                .map(|l| format!("mount {l}")),
        );
        left.extend(
            std::fs::read_to_string("/proc/net/unix")
                .unwrap()
                .lines()
                .filter(|l| l.contains(&mark) && !l.contains("containerd.sock"))
                .map(|l| format!("socket {l}")),
        );
        left
    }

    /// The PIDs of this test's shims.
    fn shim_pids(&self) -> Vec<i32> {
        let shim = bin("containerd-shim-torii-v2").display().to_string();
        let mark = self.dir.path().display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                (cmd.starts_with(&shim) && cmd.contains(&mark))
                    .then(|| e.file_name().to_string_lossy().parse().ok())?
            })
            .collect()
    }

    /// containerd ends (SIGKILL); its shims live on, as they would in production.
    fn kill_containerd(&mut self) {
        let child = self.daemon.child_mut();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Everything of the pods is gone (processes take a moment to be reaped once stopped).
    fn assert_clean(&self) {
        let clean =
            proc_util::wait_until(Duration::from_secs(45), Duration::from_millis(100), || {
                self.left().is_empty()
            });
        assert!(clean, "left behind: {:#?}", self.left());
    }
}

impl Drop for Containerd {
    /// A failed test's shims outlive its containerd (shims are made to survive containerd
    /// restarts): they are told to end, and their VMs and disk backends go with them.
    fn drop(&mut self) {
        let shims = self.shim_pids();
        if shims.is_empty() {
            return;
        }
        self.kill_containerd();
        for &pid in &shims {
            // SAFETY: kill(2) on a shim of this test's.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let ended =
            proc_util::wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
                self.shim_pids().is_empty()
            });
        if !ended {
            for pid in self.shim_pids() {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn run_args<'a>(id: &'a str, extra: &[&'a str], cmd: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["run", "--runtime", RUNTIME];
    a.extend_from_slice(extra);
    a.push(IMAGE);
    a.push(id);
    a.extend_from_slice(cmd);
    a
}

#[test]
fn a_container_runs_in_a_pod_vm_and_its_exit_code_comes_back() {
    let _heavy = torii_perf::heavy_test_lock();
    let cd = Containerd::start("run");
    let out = cd.ctr(&run_args("c1", &["--rm"], &["echo", "hello"]));
    assert!(out.status.success(), "{out:?}\n{}", cd.log_tail());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    // The guest's kernel, not the host's; stderr apart from stdout; the exit code.
    let host = String::from_utf8(Command::new("uname").arg("-r").output().unwrap().stdout).unwrap();
    let out = cd.ctr(&run_args(
        "c2",
        &["--rm"],
        &["sh", "-c", "uname -r; echo oops >&2; exit 7"],
    ));
    assert_eq!(out.status.code(), Some(7), "{out:?}\n{}", cd.log_tail());
    let guest = String::from_utf8_lossy(&out.stdout);
    assert!(
        !guest.is_empty() && guest != host,
        "guest {guest:?}, host {host:?}"
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .next_back(),
        Some("oops")
    );
    // stdin reaches the process, and its end closes the process's stdin.
    let mut child = cd
        .ctr_cmd(&run_args(
            "c3",
            &["--rm"],
            &["sh", "-c", "wc -l; cat /proc/1/comm"],
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"a\nb\nc\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}\n{}", cd.log_tail());
    // The container sees its own /proc: the guest's init is the agent.
    assert_eq!(String::from_utf8_lossy(&out.stdout), "3\ninit\n");
    // A program that does not exist fails the start, and nothing stays.
    let out = cd.ctr(&run_args("c4", &["--rm"], &["/bin/nonesuch"]));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nonesuch"), "{err}");
    let _ = cd.ctr(&["container", "rm", "c4"]);
    cd.assert_clean();
}

#[test]
fn a_detached_task_takes_execs_and_signals_and_shows_its_state() {
    let _heavy = torii_perf::heavy_test_lock();
    let cd = Containerd::start("detached");
    let events_log = std::fs::File::create(cd.dir.join("events.log")).unwrap();
    let events = cd.ctr_cmd(&["events"]).stdout(events_log).spawn().unwrap();
    let mut events = ChildGuard::new(events, "ctr events");
    cd.ok(&run_args("d1", &["-d"], &["sleep", "1000"]));
    cd.wait_status("d1", "RUNNING");
    let socket = cd.shim_socket("d1");
    let out = cd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "d1",
        "sh",
        "-c",
        "echo in-vm; ls /; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5), "{out:?}\n{}", cd.log_tail());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("in-vm\n"), "{stdout}");
    assert!(
        stdout.contains("lost+found"),
        "the root is the container's ext4: {stdout}"
    );
    // The task's processes: the sleep and nothing else now.
    let ps = cd.ok(&["task", "ps", "d1"]);
    assert_eq!(ps.lines().count(), 2, "{ps}");
    let metrics = cd.ok(&["task", "metrics", "d1"]);
    assert!(metrics.contains("memory.usage_in_bytes"), "{metrics}");
    // Not deletable while it runs; SIGTERM stops it, then it is.
    let out = cd.ctr(&["task", "delete", "d1"]);
    assert!(!out.status.success());
    cd.ok(&["task", "kill", "d1"]);
    cd.wait_status("d1", "STOPPED");
    let out = cd.ctr(&["task", "kill", "d1"]);
    assert!(!out.status.success(), "a stopped task cannot be signalled");
    cd.ok(&["task", "delete", "d1"]);
    assert_eq!(cd.status("d1"), None);
    cd.ok(&["container", "rm", "d1"]);
    cd.assert_clean();
    let gone = proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
        !socket.exists()
    });
    assert!(gone, "the shim's socket {} is left", socket.display());
    // What the shim published, in order for the task and its exec.
    let _ = events.kill();
    let log = std::fs::read_to_string(cd.dir.join("events.log")).unwrap();
    let topics: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("/tasks/")))
        .collect();
    assert_eq!(
        topics,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/exit",
            "/tasks/delete",
        ],
        "{log}"
    );
}

#[test]
fn containers_of_one_sandbox_share_its_vm_with_their_own_root_file_systems() {
    let _heavy = torii_perf::heavy_test_lock();
    let cd = Containerd::start("sandbox");
    let group = ["--annotation", "io.kubernetes.cri.sandbox-id=s1"];
    cd.ok(&run_args(
        "s1",
        &[&["-d"][..], &group].concat(),
        &["sleep", "1000"],
    ));
    cd.ok(&run_args(
        "s1b",
        &[&["-d"][..], &group].concat(),
        &["sleep", "1000"],
    ));
    cd.wait_status("s1", "RUNNING");
    cd.wait_status("s1b", "RUNNING");
    let qemus: Vec<String> = cd
        .leftovers()
        .into_iter()
        .filter(|c| c.contains("qemu-system"))
        .collect();
    assert_eq!(qemus.len(), 1, "{qemus:#?}");
    let exec = |id: &str, script: &str| {
        let out = cd.ctr(&["task", "exec", "--exec-id", "x", id, "sh", "-c", script]);
        assert!(out.status.success(), "{out:?}\n{}", cd.log_tail());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let boot = "cat /proc/sys/kernel/random/boot_id";
    assert_eq!(exec("s1", boot), exec("s1b", boot));
    exec("s1", "echo mine > /tmp/mark");
    assert_eq!(exec("s1", "cat /tmp/mark"), "mine\n");
    assert_eq!(exec("s1b", "ls /tmp"), "");
    // The second one goes first: its disk is unplugged from the running VM.
    cd.ok(&["task", "kill", "-s", "KILL", "s1b"]);
    cd.wait_status("s1b", "STOPPED");
    cd.ok(&["task", "delete", "s1b"]);
    cd.ok(&["container", "rm", "s1b"]);
    assert_eq!(exec("s1", "cat /tmp/mark"), "mine\n");
    let files: Vec<String> = std::fs::read_dir(cd.state_dir().join("s1"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!files.iter().any(|f| f.starts_with("s1b")), "{files:?}");
    cd.ok(&["task", "kill", "s1"]);
    cd.wait_status("s1", "STOPPED");
    cd.ok(&["task", "delete", "s1"]);
    cd.ok(&["container", "rm", "s1"]);
    cd.assert_clean();
}

#[test]
fn annotations_shape_the_vm_and_bad_ones_are_refused_whole() {
    let _heavy = torii_perf::heavy_test_lock();
    let cd = Containerd::start("knobs");
    // An extra Torii disk: an ext4 image served by a torii-vhost-user-blk of the operator's.
    let (mut volume, socket, _) = proc_util::serve_ext4_image(
        &bin("torii-vhost-user-blk"),
        cd.dir.path(),
        "volume",
        &[("hello", "from a Torii disk\n")],
    );
    // A vhost-user port of torii-dataplane's, as torii-cni describes it in a pod network file.
    let dp_cfg = cd.dir.join("dataplane.toml");
    let d = cd.dir.path().display();
    std::fs::write(
        &dp_cfg,
        format!(
            "[dataplane]\npmd_mode = \"adaptive\"\ncontrol_socket = \"{d}/control.sock\"\n\
             [[port]]\nname = \"eth0\"\ntype = \"vhost-user\"\nsocket = \"{d}/eth0.sock\"\n"
        ),
    )
    .unwrap();
    let mut dp = Command::new(bin("torii-dataplane"));
    dp.args(["run", "-c"])
        .arg(&dp_cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    proc_util::die_with_parent(&mut dp);
    let dataplane = ChildGuard::new(dp.spawn().unwrap(), "torii-dataplane");
    proc_util::wait_for_path(cd.dir.join("control.sock"), Duration::from_secs(20)).unwrap();
    proc_util::wait_for_path(cd.dir.join("eth0.sock"), Duration::from_secs(20)).unwrap();
    let net = cd.dir.join("eth0.json");
    std::fs::write(
        &net,
        format!(
            r#"{{"ifname": "eth0", "type": "vhost-user", "socket": "{d}/eth0.sock", "mode": "client",
                "mac": "02:00:00:77:00:02", "mtu": 1500,
                "ips": [{{"address": "10.77.0.2/24", "gateway": "10.77.0.1", "interface": 0}}],
                "routes": [{{"dst": "0.0.0.0/0"}}], "dns": {{}}}}"#
        ),
    )
    .unwrap();
    let network = format!("io.torii.network={}", net.display());
    let disks = format!("io.torii.disks={}=/data:ro", socket.display());
    let knobs = [
        "--annotation",
        "io.torii.vcpus=2",
        "--annotation",
        "io.torii.pin=0,1",
        "--annotation",
        "io.torii.hugepages=true",
        "--annotation",
        &disks,
        "--annotation",
        &network,
    ];
    cd.ok(&run_args(
        "k1",
        &[&["-d"][..], &knobs].concat(),
        &["sleep", "1000"],
    ));
    cd.wait_status("k1", "RUNNING");
    let script = "nproc; cat /data/hello; ip -o -4 addr show dev eth0 | awk '{print $4}'; \
                  ip route | grep default; cat /sys/class/net/eth0/address";
    let out = cd.ctr(&["task", "exec", "--exec-id", "x", "k1", "sh", "-c", script]);
    assert!(out.status.success(), "{out:?}\n{}", cd.log_tail());
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(
        lines[..3],
        ["2", "from a Torii disk", "10.77.0.2/24"],
        "{lines:?}"
    );
    assert!(
        lines[3].starts_with("default via 10.77.0.1 dev eth0"),
        "{lines:?}"
    );
    assert_eq!(lines[4], "02:00:00:77:00:02");
    let qemu = cd
        .leftovers()
        .into_iter()
        .find(|c| c.contains("qemu-system"));
    let qemu = qemu.expect("the sandbox's QEMU");
    assert!(qemu.contains("hugetlb=on"), "{qemu}");
    cd.ok(&["task", "kill", "-s", "KILL", "k1"]);
    cd.wait_status("k1", "STOPPED");
    cd.ok(&["task", "delete", "k1"]);
    cd.ok(&["container", "rm", "k1"]);
    // The operator's backend is not the shim's to stop.
    assert!(volume.is_running());
    drop(volume);
    drop(dataplane);
    let out = cd.ctr(&run_args(
        "k2",
        &["--rm", "--annotation", "io.torii.vcpu=2"],
        &["true"],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown annotation io.torii.vcpu"), "{err}");
    let _ = cd.ctr(&["container", "rm", "k2"]);
    cd.assert_clean();
}

#[test]
fn the_shim_tells_its_version_and_the_kubernetes_snippet_is_containerds() {
    let out = Command::new(bin("containerd-shim-torii-v2"))
        .arg("-v")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v = String::from_utf8_lossy(&out.stdout);
    assert!(
        v.contains(RUNTIME) && v.contains(env!("CARGO_PKG_VERSION")),
        "{v}"
    );
    // The RuntimeClass's handler, as containerd reads runtime/k8s/containerd-torii.toml.
    torii_perf::prereq::require_binary("containerd", "apt-get install containerd (scripts/setup)")
        .expect("prerequisite");
    let dir = proc_util::unique_tmp_dir("torii-cd-snippet").unwrap();
    let snippet = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/containerd-torii.toml"),
    )
    .unwrap();
    let d = dir.path().display();
    std::fs::write(
        dir.join("config.toml"),
        format!("version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n{snippet}"),
    )
    .unwrap();
    let out = Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .args(["config", "dump"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let dump = String::from_utf8_lossy(&out.stdout);
    let torii = dump
        .split("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.torii]")
        .nth(1)
        .unwrap_or_else(|| panic!("no torii runtime in:\n{dump}"));
    let torii = torii.split("\n  [").next().unwrap_or("");
    assert!(
        torii.contains("runtime_type = \"io.containerd.torii.v2\""),
        "{torii}"
    );
    assert!(
        torii.contains("pod_annotations = [\"io.torii.*\"]"),
        "{torii}"
    );
    let rc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/runtimeclass.yaml"),
    )
    .unwrap();
    assert!(rc.contains("handler: torii"), "{rc}");
}

#[test]
fn a_shim_that_dies_takes_its_vm_with_it_and_containerd_cleans_up_after_it() {
    let _heavy = torii_perf::heavy_test_lock();
    let cd = Containerd::start("crash");
    cd.ok(&run_args("x1", &["-d"], &["sleep", "1000"]));
    cd.wait_status("x1", "RUNNING");
    let shim = cd
        .leftovers()
        .into_iter()
        .filter(|c| c.contains("containerd-shim-torii-v2"))
        .count();
    assert_eq!(shim, 1);
    let pids = cd.shim_pids();
    assert_eq!(pids.len(), 1);
    let socket = cd.shim_socket("x1");
    assert!(socket.exists(), "{}", socket.display());
    // SAFETY: kill(2) on a process of this test's.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    // containerd sees the shim go, runs `containerd-shim-torii-v2 delete` and drops the task.
    let gone = proc_util::wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        cd.status("x1").is_none()
    });
    assert!(gone, "x1 is {:?}\n{}", cd.status("x1"), cd.log_tail());
    cd.ok(&["container", "rm", "x1"]);
    // The VM and the rootfs backend went with the shim; `delete` removed its files.
    let left = proc_util::wait_until(Duration::from_secs(20), Duration::from_millis(100), || {
        cd.leftovers().is_empty()
    });
    assert!(left, "{:#?}", cd.leftovers());
    cd.assert_clean();
    assert!(
        !socket.exists(),
        "the dead shim's socket {}",
        socket.display()
    );
}

#[test]
fn a_shim_whose_containerd_is_gone_ends_on_sigterm_and_takes_its_pod_with_it() {
    let _heavy = torii_perf::heavy_test_lock();
    let mut cd = Containerd::start("orphan");
    let group = ["-d", "--annotation", "io.kubernetes.cri.sandbox-id=t1"];
    cd.ok(&run_args("t1", &group, &["sleep", "1000"]));
    cd.ok(&run_args("t2", &group, &["sleep", "1000"]));
    cd.wait_status("t1", "RUNNING");
    cd.wait_status("t2", "RUNNING");
    let pids = cd.shim_pids();
    assert_eq!(
        pids.len(),
        1,
        "one shim serves the sandbox: {:#?}",
        cd.leftovers()
    );
    let socket = cd.shim_socket("t1");
    cd.kill_containerd();
    // Without its containerd the shim, its VM and both disk backends stay up.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(cd.shim_pids(), pids);
    assert!(cd.leftovers().len() >= 4, "{:#?}", cd.leftovers());
    // SAFETY: kill(2) on this test's shim.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGTERM) }, 0);
    let ended = proc_util::wait_until(Duration::from_secs(40), Duration::from_millis(100), || {
        cd.leftovers().is_empty()
    });
    assert!(ended, "still running after SIGTERM: {:#?}", cd.leftovers());
    cd.assert_clean();
    assert!(!socket.exists(), "the shim's socket {}", socket.display());
}

#[test]
fn an_oom_kill_in_the_guest_is_told_to_containerd() {
    let _heavy = torii_perf::heavy_test_lock();
    let cd = Containerd::start("oom");
    let events_log = std::fs::File::create(cd.dir.join("events.log")).unwrap();
    let events = cd.ctr_cmd(&["events"]).stdout(events_log).spawn().unwrap();
    let mut events = ChildGuard::new(events, "ctr events");
    // A string that doubles without end, in a small VM: the guest kernel's OOM killer ends it.
    let out = cd.ctr(&run_args(
        "o1",
        &["--rm", "--annotation", "io.torii.memory_mib=192"],
        &["awk", "BEGIN { s = \"x\"; while (1) s = s s }"],
    ));
    assert_eq!(out.status.code(), Some(137), "{out:?}\n{}", cd.log_tail());
    cd.assert_clean();
    let saw_oom =
        proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            std::fs::read_to_string(cd.dir.join("events.log"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("/tasks/oom") && l.contains("\"o1\""))
        });
    assert!(
        saw_oom,
        "no /tasks/oom:\n{}",
        std::fs::read_to_string(cd.dir.join("events.log")).unwrap_or_default()
    );
    // A process killed by a signal that is not the OOM killer's is no OOM.
    let out = cd.ctr(&run_args("o2", &["--rm"], &["sh", "-c", "kill -KILL $$"]));
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    let deleted =
        proc_util::wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
            std::fs::read_to_string(cd.dir.join("events.log"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("/tasks/delete") && l.contains("\"o2\""))
        });
    // The OOM check runs beside the exit: give it the time it took for o1.
    std::thread::sleep(Duration::from_secs(2));
    let _ = events.kill();
    let log = std::fs::read_to_string(cd.dir.join("events.log")).unwrap_or_default();
    assert!(deleted, "{log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("/tasks/oom") && l.contains("\"o2\"")),
        "{log}"
    );
    cd.assert_clean();
}
