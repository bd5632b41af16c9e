//! Pod VMs end to end on QEMU (TCG): the image scripts/image builds (torii-agent as init), the
//! network and disks served by a real torii-dataplane, the guest configured through the agent.
//! Needs root, QEMU 10 and the image (scripts/test builds it; scripts/setup installs the rest).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use torii_perf::proc_util::{self, ChildGuard, TmpDir};
use torii_runtime::pod::Pod;
use torii_runtime::qemu::Qmp;
use torii_runtime::spec::{DiskSpec, SandboxSpec};

fn image_dir() -> PathBuf {
    torii_perf::prereq::pod_vm_image_dir().expect("prerequisite")
}

fn prereqs() -> PathBuf {
    torii_perf::prereq::require_root().expect("prerequisite");
    torii_perf::prereq::require_qemu().expect("prerequisite");
    image_dir()
}

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let b = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target directory");
    assert!(
        b.is_file(),
        "{} is missing: build it first (cargo build --workspace, or run scripts/test)",
        b.display()
    );
    b
}

/// A torii-dataplane serving vhost-user ports and disks from `dir`.
fn dataplane(dir: &Path, config: &str) -> ChildGuard {
    let cfg = dir.join("dataplane.toml");
    std::fs::write(
        &cfg,
        format!(
            "[dataplane]\npmd_mode = \"adaptive\"\ncontrol_socket = \"{}\"\n{config}",
            dir.join("control.sock").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("dataplane.log")).unwrap();
    let mut cmd = Command::new(bin("torii-dataplane"));
    cmd.args(["run", "-c"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    proc_util::die_with_parent(&mut cmd);
    let child = ChildGuard::new(
        cmd.spawn().expect("starting torii-dataplane"),
        "torii-dataplane",
    );
    proc_util::wait_for_path(dir.join("control.sock"), Duration::from_secs(20))
        .expect("torii-dataplane control socket");
    // Ports and disks bind their sockets on threads of their own, after the control socket.
    for line in config.lines() {
        if let Some(sock) = line
            .strip_prefix("socket = \"")
            .and_then(|l| l.strip_suffix('"'))
        {
            proc_util::wait_for_path(sock, Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("torii-dataplane socket {sock}: {e}"));
        }
    }
    child
}

fn spec(dir: &Path, image: &Path, name: &str, body: &str) -> SandboxSpec {
    let text = format!(
        "name = \"{name}\"\n[vm]\naccel = \"tcg\"\nkernel = \"{}\"\ninitramfs = \"{}\"\n{body}",
        image.join("vmlinuz").display(),
        image.join("initramfs.cpio.gz").display()
    );
    let p = dir.join(format!("spec-{}.toml", std::process::id()));
    std::fs::write(&p, text).unwrap();
    SandboxSpec::load(&p).expect("spec")
}

/// Runs `argv` in the pod; (exit code, stdout, stderr).
fn exec(pod: &Pod, argv: &[&str], signal: Option<&AtomicI32>) -> (i32, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    let st = pod
        .exec(
            &argv,
            &["PATH=/bin:/sbin:/usr/bin:/usr/sbin".into()],
            None,
            signal,
            &mut |o| {
                if o.stream == "stderr" {
                    err.extend(o.data)
                } else {
                    out.extend(o.data)
                }
            },
        )
        .expect("exec");
    (
        st.code,
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
    )
}

fn gone(pid: u32) -> bool {
    // SAFETY: kill(pid, 0) only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) != 0 }
}

fn tmp(tag: &str) -> TmpDir {
    proc_util::unique_tmp_dir(tag).expect("tmp dir")
}

#[test]
fn pod_is_configured_by_its_agent_runs_commands_and_keeps_data_on_a_torii_disk() {
    let image = prereqs();
    let _heavy = torii_perf::heavy_test_lock();
    let dir = tmp("torii-pod-vm");
    let disk = dir.join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(32 << 20).unwrap();
    let mk = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(mk.success(), "mkfs.ext4 (e2fsprogs)");
    let _dp = dataplane(
        dir.path(),
        &format!(
            "[[port]]\nname = \"p1\"\ntype = \"vhost-user\"\nsocket = \"{d}/p1.sock\"\n\
             [[disk]]\nname = \"d1\"\nsocket = \"{d}/d1.sock\"\nfile = \"{d}/disk.img\"\n",
            d = dir.path().display()
        ),
    );
    let s = spec(
        dir.path(),
        &image,
        "vm-e2e",
        &format!(
            "[[interface]]\ntype = \"vhost-user\"\nsocket = \"{d}/p1.sock\"\nmac = \"52:54:00:12:00:01\"\n\
             name = \"net0\"\nmtu = 1400\naddresses = [\"10.77.0.2/24\", \"fd77::2/64\"]\n\
             routes = [{{ dest = \"10.78.0.0/16\", gateway = \"10.77.0.1\" }}, {{ dest = \"default\", gateway = \"10.77.0.254\" }}]\n\
             [[disk]]\nsocket = \"{d}/d1.sock\"\nmount = \"/data\"\n\
             [[neighbor]]\nip = \"10.77.0.9\"\nmac = \"52:54:00:12:00:09\"\ndevice = \"net0\"\n",
            d = dir.path().display()
        ),
    );
    let sb = s
        .resolve(&torii_vfio::pci::Sysfs::default())
        .expect("resolve");
    let run_dir = dir.join("run");
    let pod = Pod::start(sb, &run_dir, None).expect("pod start");
    let pid = pod.vmm_pid();
    assert!(pod.dir().join("agent.sock").exists());
    pod.configure().expect("configure");

    // The interface, its addresses, MTU, routes and neighbour, as the guest's kernel has them.
    let (code, out, _) = exec(&pod, &["sh", "-c", "ip -o addr show dev net0; ip -o link show dev net0; ip route; ip -6 route; ip neigh show dev net0"], None);
    eprintln!("guest network:\n{out}");
    assert_eq!(code, 0, "{out}");
    for want in [
        "inet 10.77.0.2/24",
        "inet6 fd77::2/64",
        "mtu 1400",
        "52:54:00:12:00:01",
        "10.78.0.0/16 via 10.77.0.1 dev net0",
        "default via 10.77.0.254 dev net0",
        "10.77.0.9 lladdr 52:54:00:12:00:09",
        "PERMANENT",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    let ifs = pod
        .agent()
        .call("list_interfaces", json!(null), Duration::from_secs(10))
        .unwrap();
    assert!(ifs.to_string().contains("\"net0\""), "{ifs}");

    // Exit codes, stdout and stderr apart.
    let (code, out, err) = exec(
        &pod,
        &["sh", "-c", "echo to-out; echo to-err >&2; exit 7"],
        None,
    );
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (7, "to-out\n", "to-err\n")
    );
    let (code, _, _) = exec(&pod, &["true"], None);
    assert_eq!(code, 0);
    let r = pod.exec(&["/no/such/program".into()], &[], None, None, &mut |_| {});
    assert!(r.is_err(), "a missing program is an error, not a crash");

    // A signal reaches the command (through the agent's kill_process).
    let sig = AtomicI32::new(0);
    let (code, _, _) = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            sig.store(libc::SIGTERM, Ordering::Relaxed);
        });
        exec(&pod, &["sleep", "60"], Some(&sig))
    });
    assert_eq!(code, 128 + libc::SIGTERM);

    // The agent's vsock transport (Cloud Hypervisor's and Firecracker's channel) binds on the
    // guest kernel: a second instance of /init listening on a vsock port says it is ready.
    let (code, out, err) = exec(
        &pod,
        &[
            "sh",
            "-c",
            "/init --vsock 2000 2>/tmp/v & for i in $(seq 300); do grep -q ready /tmp/v && break; sleep 0.1; done; cat /tmp/v; kill $!",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("torii-agent: ready"), "{out}{err}");

    // Hugepages for an in-guest DPDK app: reserved, counted and hugetlbfs mounted.
    let hp = pod
        .agent()
        .call(
            "setup_hugepages",
            json!({ "count": 16, "mount": "/dev/hugepages" }),
            Duration::from_secs(30),
        )
        .expect("setup_hugepages");
    assert_eq!(
        (hp["total"].as_u64(), hp["free"].as_u64()),
        (Some(16), Some(16)),
        "{hp}"
    );
    let (_, out, _) = exec(
        &pod,
        &[
            "sh",
            "-c",
            "grep -i hugepages_total /proc/meminfo; grep hugetlbfs /proc/mounts",
        ],
        None,
    );
    assert!(
        out.contains("HugePages_Total:      16") && out.contains("/dev/hugepages hugetlbfs"),
        "{out}"
    );

    // The Torii disk is mounted at /data by the agent; what is written there reaches the file.
    let (code, out, err) = exec(
        &pod,
        &[
            "sh",
            "-c",
            "grep ' /data ' /proc/mounts && echo kept-by-torii > /data/hello && sync",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("/dev/vda /data ext4"), "{out}");

    let vm_dir = pod.dir().to_path_buf();
    pod.stop(Duration::from_secs(20)).expect("stop");
    assert!(gone(pid), "QEMU {pid} left running");
    assert!(!vm_dir.exists(), "{} left behind", vm_dir.display());
    let cat = Command::new("debugfs")
        .args(["-R", "cat /hello"])
        .arg(&disk)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "kept-by-torii\n");
}

#[test]
fn two_pods_ping_each_other_through_the_switch_and_toriictl_propagates_exit_codes() {
    let image = prereqs();
    let _heavy = torii_perf::heavy_test_lock();
    let dir = tmp("torii-pod-pair");
    let d = dir.path().display().to_string();
    let _dp = dataplane(
        dir.path(),
        &format!(
            "[[port]]\nname = \"a\"\ntype = \"vhost-user\"\nsocket = \"{d}/a.sock\"\n\
             [[port]]\nname = \"b\"\ntype = \"vhost-user\"\nsocket = \"{d}/b.sock\"\n"
        ),
    );
    let pod_spec = |name: &str, sock: &str, mac: &str, ip: &str| {
        format!(
            "name = \"{name}\"\n[vm]\naccel = \"tcg\"\nkernel = \"{k}\"\ninitramfs = \"{i}\"\n\
             [[interface]]\ntype = \"vhost-user\"\nsocket = \"{d}/{sock}\"\nmac = \"{mac}\"\naddresses = [\"{ip}/24\"]\n",
            k = image.join("vmlinuz").display(),
            i = image.join("initramfs.cpio.gz").display(),
        )
    };
    std::fs::write(
        dir.join("a.toml"),
        pod_spec("pod-a", "a.sock", "52:54:00:34:00:0a", "10.79.0.10"),
    )
    .unwrap();
    std::fs::write(
        dir.join("b.toml"),
        pod_spec("pod-b", "b.sock", "52:54:00:34:00:0b", "10.79.0.11"),
    )
    .unwrap();
    let run_dir = dir.join("run");
    let toriictl = |spec: &str, cmd: &str| {
        Command::new(bin("toriictl"))
            .arg("run")
            .arg(dir.join(spec))
            .arg("--run-dir")
            .arg(&run_dir)
            .args(["--", "sh", "-c", cmd])
            .output()
            .expect("toriictl")
    };
    // pod-b waits for a TCP message; pod-a pings it through torii-dataplane's switch, sends it
    // the message, then exits with a code of its own.
    let (a, b) = std::thread::scope(|s| {
        let b = s.spawn(|| {
            toriictl(
                "b.toml",
                "printf '#!/bin/sh\\ncat > /tmp/msg\\n' > /tmp/rx.sh && chmod +x /tmp/rx.sh && \
                 timeout 120 nc -l -p 7000 -e /tmp/rx.sh && cat /tmp/msg",
            )
        });
        let a = s.spawn(|| {
            toriictl(
                "a.toml",
                "for i in $(seq 30); do ping -c 1 -W 1 10.79.0.11 >/dev/null && break; done; \
                 ping -c 3 -W 2 10.79.0.11 && \
                 for i in $(seq 50); do echo hello-b | nc 10.79.0.11 7000 && exit 42; sleep 0.2; done",
            )
        });
        (a.join().unwrap(), b.join().unwrap())
    });
    let a_out = String::from_utf8_lossy(&a.stdout);
    assert_eq!(
        a.status.code(),
        Some(42),
        "pod-a: {a_out}\n{}",
        String::from_utf8_lossy(&a.stderr)
    );
    assert!(
        a_out.contains("3 packets transmitted, 3 packets received"),
        "{a_out}"
    );
    assert_eq!(
        b.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&b.stderr)
    );
    // What pod-a sent over TCP through the switch.
    assert_eq!(String::from_utf8_lossy(&b.stdout), "hello-b\n");
    // Nothing is left: no pod folder (sockets, logs), no QEMU.
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    let ps = proc_util::sh("pgrep -f 'torii-pod-[ab]' || true");
    assert!(ps.trim().is_empty(), "QEMU left running: {ps}");

    // SIGINT to toriictl reaches the command; the VM is still torn down.
    // Sent to toriictl's whole process group, as a terminal's Ctrl-C would be: QEMU runs in a
    // session of its own, so the signal goes through the agent, not to the VMM.
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(bin("toriictl"))
        .arg("run")
        .arg("-v")
        .arg(dir.join("a.toml"))
        .arg("--run-dir")
        .arg(&run_dir)
        .args(["--", "sh", "-c", "echo started; exec sleep 120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("toriictl");
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first, "started\n");
    // SAFETY: kill(2) on our own child's process group.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGINT) };
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(128 + libc::SIGINT));
    let ps = proc_util::sh("pgrep -f 'torii-pod-[a]' || true");
    assert!(ps.trim().is_empty(), "QEMU left running: {ps}");
    let left: Vec<_> = std::fs::read_dir(&run_dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");

    // A spec that cannot work fails before anything starts, with the field named.
    std::fs::write(dir.join("bad.toml"), "name = \"bad\"\n[vm]\nvcpus = 0\n").unwrap();
    let bad = toriictl("bad.toml", "true");
    assert_eq!(bad.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("vm.vcpus"));
}

#[test]
fn a_pod_on_a_tap_in_its_network_namespace_with_pinned_vcpus() {
    let image = prereqs();
    let _heavy = torii_perf::heavy_test_lock();
    let dir = tmp("torii-pod-tap");
    let ns = format!("torii-pod-tap-{}", std::process::id());
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "del", &ns])
        .stderr(Stdio::null())
        .status();
    let netns = Netns(ns.clone());
    for args in [
        vec!["netns", "add", &ns],
        vec!["-n", &ns, "tuntap", "add", "dev", "tpod", "mode", "tap"],
        vec!["-n", &ns, "addr", "add", "10.81.0.1/24", "dev", "tpod"],
        vec!["-n", &ns, "link", "set", "tpod", "up"],
    ] {
        let st = Command::new("ip").args(&args).status().unwrap();
        assert!(st.success(), "ip {args:?}");
    }
    let s = spec(
        dir.path(),
        &image,
        "vm-tap",
        "vcpus = 2\npin = [1, 0]\n\
         [[interface]]\ntype = \"tap\"\ntap = \"tpod\"\nmac = \"52:54:00:56:00:01\"\naddresses = [\"10.81.0.2/24\"]\n",
    );
    // (The vcpus and pin keys above land in the [vm] table `spec` starts with.)
    let mut s = s;
    s.netns = Some(PathBuf::from(format!("/run/netns/{}", netns.0)));
    let sb = s
        .resolve(&torii_vfio::pci::Sysfs::default())
        .expect("resolve");
    let pod = Pod::start(sb, &dir.join("run"), None).expect("pod start");
    pod.configure().expect("configure");
    // The guest reaches the tap's end in the pod's namespace: QEMU opened it there.
    let (code, out, err) = exec(&pod, &["ping", "-c", "2", "-W", "3", "10.81.0.1"], None);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = exec(
        &pod,
        &["sh", "-c", "grep -c ^processor /proc/cpuinfo"],
        None,
    );
    assert_eq!((code, out.trim()), (0, "2"));
    // Each vCPU thread runs on the host CPU the spec gave it (QEMU names them "CPU n/TCG").
    let pid = pod.vmm_pid();
    let mut pinned = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if let Some(n) = comm.strip_prefix("CPU ").and_then(|c| c.split('/').next()) {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap();
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .unwrap()
                .trim()
                .to_string();
            pinned.push((n.to_string(), cpus));
        }
    }
    pinned.sort();
    assert_eq!(
        pinned,
        [("0".to_string(), "1".to_string()), ("1".into(), "0".into())]
    );
    pod.stop(Duration::from_secs(20)).expect("stop");
    assert!(gone(pid));
}

/// An ext4 image of 32 MiB holding `files` (name, content), served by its own
/// torii-vhost-user-blk on `<dir>/<name>.sock`.
fn blk_backend(dir: &Path, name: &str, files: &[(&str, &str)]) -> (ChildGuard, PathBuf, PathBuf) {
    proc_util::serve_ext4_image(&bin("torii-vhost-user-blk"), dir, name, files)
}

fn disk_spec(socket: &Path, mount: &str) -> DiskSpec {
    DiskSpec {
        socket: socket.to_path_buf(),
        queues: 1,
        mount: Some(mount.into()),
        fstype: "ext4".into(),
        options: String::new(),
        read_only: false,
    }
}

/// What QEMU has in guest PCI slot `slot` (`query-pci`), and whether chardev `dc<slot>` is
/// there.
fn qemu_slot(pod: &Pod, slot: u8) -> (Option<String>, bool) {
    let mut qmp = Qmp::connect(&pod.dir().join("qmp.sock"), Duration::from_secs(10)).unwrap();
    let pci = qmp.execute("query-pci", json!(null)).unwrap();
    let dev = pci[0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["slot"] == slot)
        .map(|d| d["qdev_id"].as_str().unwrap_or("").to_string());
    let chardevs = qmp.execute("query-chardev", json!(null)).unwrap();
    let chardev = chardevs
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["label"] == format!("dc{slot:02x}"));
    (dev, chardev)
}

#[test]
fn disks_are_hot_plugged_into_a_running_pod_mounted_and_unplugged_again() {
    let image = prereqs();
    let _heavy = torii_perf::heavy_test_lock();
    let dir = tmp("torii-pod-hotplug");
    let (_a, sock_a, img_a) = blk_backend(dir.path(), "a", &[("hello", "from-disk-a\n")]);
    let (_b, sock_b, _) = blk_backend(dir.path(), "b", &[("hello", "from-disk-b\n")]);
    let s = spec(dir.path(), &image, "vm-hotplug", "");
    let sb = s
        .resolve(&torii_vfio::pci::Sysfs::default())
        .expect("resolve");
    let mut pod = Pod::start(sb, &dir.join("run"), None).expect("pod start");
    pod.configure().expect("configure");

    // Two containers' root file systems, one after the other, into the first free slots.
    let t = Instant::now();
    let a = pod
        .add_disk(&disk_spec(&sock_a, "/run/c/a"))
        .expect("add disk a");
    let add_a = t.elapsed();
    let t = Instant::now();
    let b = pod
        .add_disk(&disk_spec(&sock_b, "/run/c/b"))
        .expect("add disk b");
    let add_b = t.elapsed();
    assert_eq!((a.slot, b.slot), (0x10, 0x11));
    assert_eq!(pod.sandbox.disks.len(), 2);
    let (code, out, err) = exec(
        &pod,
        &[
            "sh",
            "-c",
            "cat /run/c/a/hello /run/c/b/hello && echo written-in-a > /run/c/a/new && sync && \
             ls /sys/bus/pci/devices && grep ' /run/c/' /proc/mounts",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("from-disk-a\nfrom-disk-b\n"), "{out}");
    for want in [
        "0000:00:10.0",
        "0000:00:11.0",
        " /run/c/a ext4 ",
        " /run/c/b ext4 ",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    assert_eq!(qemu_slot(&pod, 0x10), (Some("disk10".into()), true));

    // Out again: unmounted in the guest, gone from its PCI bus and from QEMU.
    let t = Instant::now();
    pod.remove_disk(&b).expect("remove disk b");
    let remove_b = t.elapsed();
    let t = Instant::now();
    pod.remove_disk(&a).expect("remove disk a");
    let remove_a = t.elapsed();
    assert!(pod.sandbox.disks.is_empty());
    let (code, out, err) = exec(
        &pod,
        &[
            "sh",
            "-c",
            "grep ' /run/c/' /proc/mounts; ls /sys/bus/pci/devices; ls /sys/block",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains("/run/c/"), "still mounted:\n{out}");
    assert!(
        !out.contains("0000:00:10.0") && !out.contains("0000:00:11.0"),
        "still on the guest's PCI bus:\n{out}"
    );
    assert!(!out.contains("vd"), "a block device left:\n{out}");
    assert_eq!(qemu_slot(&pod, 0x10), (None, false));
    assert_eq!(qemu_slot(&pod, 0x11), (None, false));
    // What the guest wrote reached the image.
    let cat = Command::new("debugfs")
        .args(["-R", "cat /new"])
        .arg(&img_a)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cat.stdout), "written-in-a\n");

    // The slot is free again: the same disk goes back in, with what was written.
    let t = Instant::now();
    let again = pod
        .add_disk(&disk_spec(&sock_a, "/run/c/again"))
        .expect("add disk a again");
    let readd = t.elapsed();
    assert_eq!(again.slot, 0x10);
    let (code, out, err) = exec(&pod, &["cat", "/run/c/again/new"], None);
    assert_eq!((code, out.as_str()), (0, "written-in-a\n"), "{err}");
    pod.remove_disk(&again).expect("remove disk a again");
    eprintln!(
        "hot-plug + mount: {add_a:?}, {add_b:?}, again {readd:?}; unmount + unplug: \
         {remove_b:?}, {remove_a:?}"
    );
    let pid = pod.vmm_pid();
    pod.stop(Duration::from_secs(20)).expect("stop");
    assert!(gone(pid));
}

#[test]
fn a_disk_that_cannot_be_plugged_is_refused_with_the_reason_and_leaves_nothing_behind() {
    let image = prereqs();
    let _heavy = torii_perf::heavy_test_lock();
    let dir = tmp("torii-pod-hotplug-bad");
    let s = spec(dir.path(), &image, "vm-hotplug-bad", "");
    let sb = s
        .resolve(&torii_vfio::pci::Sysfs::default())
        .expect("resolve");
    let mut pod = Pod::start(sb, &dir.join("run"), None).expect("pod start");
    let nothing_in_slot = |pod: &Pod| {
        assert!(pod.sandbox.disks.is_empty());
        assert_eq!(qemu_slot(pod, 0x10), (None, false));
    };

    // A socket its backend left behind (killed): nobody listens on it.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let e = pod
        .add_disk(&disk_spec(&stale, "/run/c/x"))
        .unwrap_err()
        .to_string();
    eprintln!("refused: {e}");
    assert!(
        e.contains("stale.sock") && e.contains("no vhost-user backend listens"),
        "{e}"
    );
    nothing_in_slot(&pod);
    let e = pod
        .add_disk(&disk_spec(&dir.join("none.sock"), "/run/c/x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("none.sock"), "{e}");
    nothing_in_slot(&pod);

    // A backend that listens but cannot give what is asked (it serves one queue): QEMU's
    // refusal, in its words; its chardev is removed with it.
    let (_c, sock_c, _) = blk_backend(dir.path(), "c", &[("hello", "from-disk-c\n")]);
    let mut four = disk_spec(&sock_c, "/run/c/c");
    four.queues = 4;
    let e = pod.add_disk(&four).unwrap_err().to_string();
    eprintln!("refused: {e}");
    assert!(
        e.contains("device_add") && e.contains("maximum number of queues"),
        "{e}"
    );
    nothing_in_slot(&pod);

    // A mount that fails: the disk is unplugged again.
    let mut bad_fs = disk_spec(&sock_c, "/run/c/c");
    bad_fs.fstype = "xfs".into();
    let e = pod.add_disk(&bad_fs).unwrap_err().to_string();
    eprintln!("refused: {e}");
    assert!(e.contains("/run/c/c"), "{e}");
    nothing_in_slot(&pod);

    // And slot 0x10 takes a good disk after all that.
    let c = pod.add_disk(&disk_spec(&sock_c, "/run/c/c")).expect("add");
    assert_eq!(c.slot, 0x10);
    let (code, out, _) = exec(&pod, &["cat", "/run/c/c/hello"], None);
    assert_eq!((code, out.as_str()), (0, "from-disk-c\n"));
    pod.stop(Duration::from_secs(20)).expect("stop");
}

#[test]
fn a_disk_given_at_start_is_unplugged_like_a_hot_plugged_one_and_its_slot_reused() {
    let image = prereqs();
    let _heavy = torii_perf::heavy_test_lock();
    let dir = tmp("torii-pod-coldplug");
    let (_r, sock_r, _) = blk_backend(dir.path(), "root", &[("hello", "from-root\n")]);
    let (_a, sock_a, _) = blk_backend(dir.path(), "a", &[("hello", "from-disk-a\n")]);
    let s = spec(
        dir.path(),
        &image,
        "vm-coldplug",
        &format!(
            "[[disk]]\nsocket = \"{}\"\nmount = \"/run/c/root\"\n",
            sock_r.display()
        ),
    );
    let sb = s
        .resolve(&torii_vfio::pci::Sysfs::default())
        .expect("resolve");
    let mut pod = Pod::start(sb, &dir.join("run"), None).expect("pod start");
    pod.configure().expect("configure");
    let root = pod.sandbox.disks[0].clone();
    assert_eq!(root.slot, 0x10);
    let (code, out, _) = exec(&pod, &["cat", "/run/c/root/hello"], None);
    assert_eq!((code, out.as_str()), (0, "from-root\n"));
    assert_eq!(qemu_slot(&pod, 0x10), (Some("disk10".into()), true));

    pod.remove_disk(&root)
        .expect("remove the disk given at start");
    let (code, out, err) = exec(
        &pod,
        &[
            "sh",
            "-c",
            "grep ' /run/c/' /proc/mounts; ls /sys/bus/pci/devices",
        ],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        !out.contains("/run/c/root") && !out.contains("0000:00:10.0"),
        "{out}"
    );
    assert_eq!(qemu_slot(&pod, 0x10), (None, false));
    // Removing it again: it is not the pod's any more.
    let e = pod.remove_disk(&root).unwrap_err().to_string();
    assert!(e.contains("no disk of") && e.contains("0x10"), "{e}");

    // Its slot is the first free one again.
    let a = pod
        .add_disk(&disk_spec(&sock_a, "/run/c/a"))
        .expect("add disk a");
    assert_eq!(a.slot, 0x10);
    let (code, out, _) = exec(&pod, &["cat", "/run/c/a/hello"], None);
    assert_eq!((code, out.as_str()), (0, "from-disk-a\n"));
    pod.stop(Duration::from_secs(20)).expect("stop");
}

/// torii-agent is the guest's init, so a tenant's process cannot kill it: SIGKILL sent to PID 1
/// from inside the guest is dropped by the kernel, and `kill -9 -1` (every process) ends all
/// but the agent and the sender. The first kill is sent by a process that streams 8 MB of
/// output meanwhile, which arrives whole; the agent keeps serving.
#[test]
fn the_agent_survives_sigkill_from_inside_the_guest_under_load() {
    let image = prereqs();
    let _heavy = torii_perf::heavy_test_lock();
    let dir = tmp("torii-pod-kill");
    let s = spec(dir.path(), &image, "vm-kill", "");
    let sb = s
        .resolve(&torii_vfio::pci::Sysfs::default())
        .expect("resolve");
    let pod = Pod::start(sb, &dir.join("run"), None).expect("pod start");
    pod.configure().expect("configure");
    const BYTES: usize = 8_000_000;
    // A tenant process that streams output and, from a child of its own meanwhile, sends
    // SIGKILL to PID 1.
    let flood = exec(
        &pod,
        &[
            "sh",
            "-c",
            &format!(
                "(sleep 0.1; kill -9 1 && echo sent >&2) & yes 0123456789abcdef | head -c {BYTES}; wait"
            ),
        ],
        None,
    );
    assert!(flood.2.contains("sent"), "kill -9 1 failed: {}", flood.2);
    assert_eq!(flood.0, 0, "{}", flood.2);
    assert_eq!(flood.1.len(), BYTES, "the output under the kill was cut");
    let health = pod
        .agent()
        .call("health", json!({}), Duration::from_secs(10))
        .expect("health after kill -9 1");
    assert_eq!(health["status"], "serving");

    // Every process but init: a long sleeper goes, the agent stays.
    let (code, out, err) = exec(
        &pod,
        &[
            "sh",
            "-c",
            "sleep 1000 & sleep 0.2; kill -9 -1; echo survived",
        ],
        None,
    );
    // kill(-1) spares the sender and init; everything else goes.
    assert_eq!((code, out.trim()), (0, "survived"), "{err}");
    let (code, out, _) = exec(&pod, &["sh", "-c", "pgrep -x sleep || echo none"], None);
    assert_eq!((code, out.trim()), (0, "none"));
    pod.stop(Duration::from_secs(30)).expect("stop");
}
