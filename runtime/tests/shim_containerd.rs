//! containerd-shim-torii-v2 end to end, driven through `ctr` against a private containerd 1.6
//! (tests/common/containerd.rs) with a busybox OCI image built here and imported
//! (tests/common/oci_image.rs): a container's output and exit status, a detached task with
//! execs and signals, two containers sharing one sandbox VM with root file systems of their
//! own, the NFV annotations, and nothing left behind once the containers are gone.
//!
//! Each test has its own containerd, folder and shim state_dir; the tests that boot pod VMs
//! (QEMU TCG, ~5 s each) take the heavy-test lock, so they run one at a time. Needs root,
//! containerd, QEMU 10, busybox-static, e2fsprogs (scripts/setup), the pod VM image
//! (scripts/image) and the workspace's binaries (cargo build --workspace): scripts/test has it
//! all. `TORII_KEEP_TMP=1` keeps each test's folder, containerd's and the shims' log included.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::containerd::{image_kernel_release, unix_socket_paths, Containerd, CtrOutput, RUNTIME};
use common::oci_image;

/// How long a task may take to show a state it is bound for (a signal through the agent, or
/// the start of a VM's shutdown).
const STATE_TIMEOUT: Duration = Duration::from_secs(30);

fn shim() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_containerd-shim-torii-v2"))
}

/// A containerd for one test, with the busybox image imported; the image's name.
fn containerd(tag: &str) -> (Containerd, String) {
    let cd = Containerd::start(tag, shim());
    let image = cd.import_busybox();
    (cd, image.name)
}

/// `run --runtime io.containerd.torii.v2 OPTS IMAGE ID CMD…`.
fn run<'a>(image: &'a str, id: &'a str, opts: &[&'a str], cmd: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["run", "--runtime", RUNTIME];
    a.extend_from_slice(opts);
    a.extend_from_slice(&[image, id]);
    a.extend_from_slice(cmd);
    a
}

/// `ctr task exec --exec-id EXEC ID sh -c SCRIPT`.
fn exec(cd: &Containerd, id: &str, exec_id: &str, script: &str) -> CtrOutput {
    cd.ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script])
}

/// [`exec`], which must succeed; its stdout.
#[track_caller]
fn exec_ok(cd: &Containerd, id: &str, exec_id: &str, script: &str) -> String {
    let out = exec(cd, id, exec_id, script);
    assert!(out.success(), "{out}\n{}", cd.log_tail(40));
    out.stdout
}

/// Stops a running task with `signal`, then deletes it and its container.
#[track_caller]
fn stop_and_remove(cd: &Containerd, id: &str, signal: &str) {
    cd.ctr_ok(&["task", "kill", "--signal", signal, id]);
    cd.wait_task_status(id, "STOPPED", STATE_TIMEOUT);
    cd.ctr_ok(&["task", "delete", id]);
    cd.ctr_ok(&["container", "rm", id]);
}

fn host_kernel_release() -> String {
    let out = Command::new("uname").arg("-r").output().expect("uname");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The harness itself, no shim involved: the image built here imports under its name and
/// unpacks into a snapshot a container can be made from (`ctr container create` prepares the
/// container's snapshot; no runtime runs until a task starts).
#[test]
fn the_busybox_image_imports_by_name_and_unpacks_into_a_snapshot() {
    let cd = Containerd::start("image", shim());
    let image = cd.import_busybox();
    let listed = cd.ctr_ok(&["image", "ls"]);
    let row = listed
        .lines()
        .find(|l| l.starts_with(&format!("{} ", image.name)))
        .unwrap_or_else(|| panic!("{} not in:\n{listed}", image.name));
    let platform = format!("linux/{}", oci_image::oci_architecture());
    assert!(row.contains(&platform), "{row}");

    cd.ctr_ok(&[
        "container",
        "create",
        "--runtime",
        RUNTIME,
        &image.name,
        "probe",
    ]);
    assert_eq!(cd.containers(), ["probe"]);
    // The container's snapshot is active on top of the committed layer, whose key is the
    // layer's chain id: for a single layer, its diff_id.
    let snapshots = cd.ctr_ok(&["snapshot", "ls"]);
    let probe: Vec<&str> = snapshots
        .lines()
        .find(|l| l.starts_with("probe "))
        .unwrap_or_else(|| panic!("no snapshot for probe:\n{snapshots}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        probe,
        ["probe", image.diff_id.as_str(), "Active"],
        "{snapshots}"
    );
    // The unpacked layer holds the host's busybox and its applet links.
    let mounts = cd.ctr_ok(&["snapshot", "mounts", "/mnt/unused", "probe"]);
    let lower = mounts
        .split(['=', ',', ' '])
        .skip_while(|w| *w != "lowerdir")
        .nth(1)
        .unwrap_or_else(|| panic!("no lowerdir in {mounts:?}"));
    let lower = Path::new(lower.trim());
    assert_eq!(
        std::fs::read(lower.join("bin/busybox")).expect("busybox in the unpacked layer"),
        std::fs::read(&image.busybox).unwrap()
    );
    assert_eq!(
        std::fs::read_link(lower.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );

    cd.ctr_ok(&["container", "rm", "probe"]);
    assert!(cd.containers().is_empty());
    let snapshots = cd.ctr_ok(&["snapshot", "ls"]);
    assert!(!snapshots.contains("probe"), "{snapshots}");
    let left = cd.shutdown();
    assert!(left.is_empty(), "had to clean up:\n{left}");
}

/// The harness itself: what a pod could leave behind — a process naming the state_dir, a file
/// in it, a mount and a listening socket under the harness's folder — is seen, and shutting
/// the harness down kills and unmounts it and says so.
#[test]
fn the_harness_sees_and_cleans_up_what_pods_leave_behind() {
    let cd = Containerd::start("leftovers", shim());
    assert!(cd.leftovers().is_empty(), "{}", cd.leftovers());
    let pod = cd.state_dir().join("pod");
    std::fs::create_dir_all(&pod).unwrap();
    // A "QEMU": sleep, run through a link named like QEMU, so its argv[0] is under state_dir.
    let fake_qemu = pod.join("qemu-system-x86_64");
    std::os::unix::fs::symlink(
        torii_perf::prereq::find_binary("sleep").expect("sleep"),
        &fake_qemu,
    )
    .unwrap();
    let mut qemu = Command::new(&fake_qemu).arg("1000").spawn().unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(pod.join("agent.sock")).unwrap();
    let mnt = cd.dir().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let c = std::ffi::CString::new(mnt.display().to_string()).unwrap();
    // SAFETY: valid NUL-terminated paths; a bind mount of a folder of ours onto itself.
    let rc = unsafe {
        libc::mount(
            c.as_ptr(),
            c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "bind mount: {}", std::io::Error::last_os_error());

    let ok = torii_perf::proc_util::wait_until(
        Duration::from_secs(5),
        Duration::from_millis(20),
        || cd.processes_of("qemu-system").len() == 1,
    );
    assert!(ok, "the fake QEMU is not seen: {:#?}", cd.processes());
    let left = cd.leftovers();
    assert_eq!(left.processes.len(), 1, "{left}");
    assert_eq!(left.processes[0].pid, qemu.id() as i32);
    assert_eq!(left.state_entries, std::slice::from_ref(&pod), "{left}");
    assert_eq!(left.mounts, [mnt.display().to_string()], "{left}");
    assert_eq!(
        left.sockets,
        [pod.join("agent.sock").display().to_string()],
        "{left}"
    );

    let killed = cd.shutdown();
    assert_eq!(killed.processes.len(), 1, "{killed}");
    assert_eq!(killed.mounts, [mnt.display().to_string()], "{killed}");
    let st = qemu.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&st),
        Some(libc::SIGKILL)
    );
    assert!(!common::containerd::mount_points()
        .iter()
        .any(|m| Path::new(m) == mnt));
}

#[test]
fn a_container_prints_and_exits_with_its_status() {
    let _vm = torii_perf::heavy_test_lock();
    let (cd, image) = containerd("run");
    let out = cd.ctr(&run(&image, "c1", &["--rm"], &["echo", "hello"]));
    assert!(out.success(), "{out}\n{}", cd.log_tail(40));
    assert_eq!(out.stdout, "hello\n", "{out}");

    // ctr exits with the task's exit status; stderr comes back apart from stdout.
    let out = cd.ctr(&run(
        &image,
        "c1-exit",
        &["--rm"],
        &["sh", "-c", "echo to-stderr >&2; exit 7"],
    ));
    assert_eq!(out.code(), Some(7), "{out}\n{}", cd.log_tail(40));
    assert_eq!(out.stdout, "", "{out}");
    assert!(out.stderr.contains("to-stderr"), "{out}");
    // --rm removed both containers.
    assert!(cd.containers().is_empty(), "{:?}", cd.containers());
}

#[test]
fn a_detached_task_takes_execs_and_signals_in_its_vm() {
    let _vm = torii_perf::heavy_test_lock();
    let (cd, image) = containerd("detached");
    cd.ctr_ok(&run(&image, "c2", &["-d"], &["sleep", "1000"]));
    cd.wait_task_status("c2", "RUNNING", STATE_TIMEOUT);

    // The exec runs in the guest: its kernel is the image's, not the host's.
    let out = exec(&cd, "c2", "e1", "echo in-vm; uname -r; exit 3");
    assert_eq!(out.code(), Some(3), "{out}\n{}", cd.log_tail(40));
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0], "in-vm");
    let host = host_kernel_release();
    assert_ne!(lines[1], host, "the exec ran on the host's kernel");
    if let Some(guest) = image_kernel_release() {
        assert_eq!(lines[1], guest, "not the pod VM image's kernel");
    }
    // The exec is gone, the task still runs.
    assert_eq!(exec_ok(&cd, "c2", "e2", "echo again"), "again\n");
    assert_eq!(cd.task_status("c2").as_deref(), Some("RUNNING"));

    // `ctr task kill` sends SIGTERM.
    cd.ctr_ok(&["task", "kill", "c2"]);
    cd.wait_task_status("c2", "STOPPED", STATE_TIMEOUT);
    cd.ctr_ok(&["task", "delete", "c2"]);
    assert_eq!(cd.task_status("c2"), None);
    cd.ctr_ok(&["container", "rm", "c2"]);
    assert!(cd.containers().is_empty(), "{:?}", cd.containers());
}

#[test]
fn containers_of_one_sandbox_share_its_vm_but_not_their_root_file_systems() {
    let _vm = torii_perf::heavy_test_lock();
    let (cd, image) = containerd("sandbox");
    let opts = ["-d", "--annotation", "io.kubernetes.cri.sandbox-id=s3"];
    cd.ctr_ok(&run(&image, "s3", &opts, &["sleep", "1000"]));
    cd.ctr_ok(&run(&image, "s3b", &opts, &["sleep", "1000"]));
    cd.wait_task_status("s3", "RUNNING", STATE_TIMEOUT);
    cd.wait_task_status("s3b", "RUNNING", STATE_TIMEOUT);

    // One VM: one QEMU under the shim's state_dir, one guest kernel boot.
    let qemus = cd.processes_of("qemu-system");
    assert_eq!(
        qemus.len(),
        1,
        "QEMUs of the harness: {:#?}",
        cd.processes()
    );
    assert!(qemus[0].mentions(&cd.state_dir()), "{}", qemus[0]);
    let boot_id = "cat /proc/sys/kernel/random/boot_id";
    let a = exec_ok(&cd, "s3", "boot", boot_id);
    let b = exec_ok(&cd, "s3b", "boot", boot_id);
    assert_eq!(a.trim().len(), 36, "a boot id: {a:?}");
    assert_eq!(a, b, "s3 and s3b run in different kernels");

    // Each its own root file system.
    assert_eq!(
        exec_ok(&cd, "s3", "w", "echo s3-was-here > /mark && cat /mark"),
        "s3-was-here\n"
    );
    assert_eq!(
        exec_ok(&cd, "s3b", "r", "test -e /mark && cat /mark || echo absent"),
        "absent\n"
    );
    exec_ok(&cd, "s3b", "w", "echo s3b > /mark");
    assert_eq!(exec_ok(&cd, "s3", "r", "cat /mark"), "s3-was-here\n");

    // The second container goes first; the first one still runs in the same VM.
    stop_and_remove(&cd, "s3b", "SIGKILL");
    assert_eq!(exec_ok(&cd, "s3", "again", boot_id), a);
    stop_and_remove(&cd, "s3", "SIGTERM");
    assert!(cd.containers().is_empty(), "{:?}", cd.containers());
}

#[test]
fn annotations_size_the_sandbox_vm() {
    let _vm = torii_perf::heavy_test_lock();
    let (cd, image) = containerd("knobs");
    // The shim's configuration says 1 vCPU and 512 MiB; the annotations say otherwise.
    let out = cd.ctr(&run(
        &image,
        "c4",
        &[
            "--rm",
            "--annotation",
            "io.torii.vcpus=2",
            "--annotation",
            "io.torii.memory_mib=768",
        ],
        &["sh", "-c", "nproc; grep MemTotal /proc/meminfo"],
    ));
    assert!(out.success(), "{out}\n{}", cd.log_tail(40));
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"2"), "{out}");
    let mem_kib: u64 = lines
        .get(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {out}"));
    assert!(
        mem_kib > 640 * 1024 && mem_kib <= 768 * 1024,
        "MemTotal {mem_kib} kB for a 768 MiB guest"
    );
}

#[test]
fn nothing_is_left_behind_once_the_containers_are_deleted() {
    let _vm = torii_perf::heavy_test_lock();
    let (cd, image) = containerd("cleanup");
    // A container that runs to its end (ctr removes it)...
    let out = cd.ctr(&run(&image, "r1", &["--rm"], &["true"]));
    assert!(out.success(), "{out}\n{}", cd.log_tail(40));
    // ...and a sandbox of two, deleted one after the other.
    let opts = ["-d", "--annotation", "io.kubernetes.cri.sandbox-id=e1"];
    cd.ctr_ok(&run(&image, "e1", &opts, &["sleep", "1000"]));
    cd.ctr_ok(&run(&image, "e2", &opts, &["sleep", "1000"]));
    cd.wait_task_status("e1", "RUNNING", STATE_TIMEOUT);
    cd.wait_task_status("e2", "RUNNING", STATE_TIMEOUT);
    exec_ok(&cd, "e2", "x", "echo data > /file");

    // While they run, the checks below do see the pod: its processes, the shim's files and
    // its socket.
    let running = cd.leftovers();
    for program in ["qemu-system", "containerd-shim-torii-v2"] {
        assert!(
            running
                .processes
                .iter()
                .any(|p| p.program().starts_with(program)),
            "no {program} found among:\n{running}"
        );
    }
    assert!(
        !running.state_entries.is_empty(),
        "the shim keeps nothing in its state_dir {}",
        cd.state_dir().display()
    );
    let shim_sockets = cd.shim_sockets();
    assert!(!shim_sockets.is_empty(), "no shim address in the bundles");
    let listening = unix_socket_paths();
    for s in &shim_sockets {
        assert!(
            listening.contains(&s.display().to_string()),
            "shim socket {} does not listen",
            s.display()
        );
    }

    stop_and_remove(&cd, "e2", "SIGKILL");
    stop_and_remove(&cd, "e1", "SIGTERM");
    assert_eq!(cd.ctr_ok(&["task", "ls", "-q"]), "");
    assert!(cd.containers().is_empty(), "{:?}", cd.containers());

    // No process, file, mount or listening socket of the pods stays.
    cd.assert_clean(Duration::from_secs(30));
    let listening = unix_socket_paths();
    for s in &shim_sockets {
        let name = s.display().to_string();
        assert!(
            !listening.contains(&name),
            "shim socket {name} still listens"
        );
        assert!(!s.exists(), "shim socket {name} was not removed");
    }
    // containerd stops on SIGTERM, and nothing had to be killed or unmounted after it.
    let left = cd.shutdown();
    assert!(left.is_empty(), "had to clean up after containerd:\n{left}");
}
